# The two set-up commands of the README, and the targets they build on.
#   make demo   install, then label the shipped example clips on embedded local Ray and show the Parquet output
#   make test   install with the dev extra and the browser the web-demo test drives, then run the default suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
OUT ?= out/labels

.PHONY: demo test slow lint system-deps

$(BIN)/ser: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/ser
	$(BIN)/ser label examples --output $(OUT)
	$(BIN)/python -c "import pandas as pd; print(pd.read_parquet('$(OUT)')[['path', 'label', 'confidence', 'status']].to_string())"

# Debian's Chromium drives the web-demo browser test; espeak-ng/sox make example speech.
system-deps:
	@command -v chromium >/dev/null && command -v espeak-ng >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver espeak-ng sox >/dev/null; }

test: $(BIN)/ser system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest

slow: $(BIN)/ser system-deps
	$(BIN)/pytest -m slow

lint: $(BIN)/ser
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
