"""The `ser` command line, in process with click's runner: output formats, per-file errors, exit codes."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_audio

from ser import __version__, ravdess
from ser import config as config_io
from ser.cli import main
from ser.training import TrainConfig

LINE = r"Predicted Emotion: (?:{}) \(Confidence: [01]\.\d\d\)".format("|".join(ravdess.EMOTIONS))


def ser(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="ser", catch_exceptions=False)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    good = [write_audio(root / "short.wav", 2.0), write_audio(root / "long.flac", 5.0, sample_rate=44100, seed=1)]
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not audio\n")
    bad = [root / "missing.wav", root / "empty.wav", root / "notes.txt"]
    return [str(p) for p in good], [str(p) for p in bad]


def test_predict_one_file(clips, tiny_bundle):
    result = ser("predict", clips[0][0], "--model", tiny_bundle)
    assert result.exit_code == 0, result.stderr
    assert re.fullmatch(LINE + "\n", result.stdout)
    assert result.stderr == ""


def test_predict_several_files_prefixes_each_line_with_its_path(clips, tiny_bundle):
    good, _ = clips
    result = ser("predict", *good, "--model", tiny_bundle)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(good)
    for path, line in zip(good, lines, strict=True):
        assert re.fullmatch(re.escape(path) + ": " + LINE, line)


def test_predict_json(clips, tiny_bundle):
    good, _ = clips
    result = ser("predict", *good, "--model", tiny_bundle, "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == good
    for row in rows:
        assert row["status"] == "ok" and row["model"] == "tiny-test"
        assert set(row["probabilities"]) == set(ravdess.EMOTIONS)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == row["probabilities"][row["label"]]
    assert [row["n_windows"] for row in rows] == [1, 3]
    assert [row["duration_s"] for row in rows] == [2.0, 5.0]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_bad_files_are_reported_and_the_rest_predicted(clips, tiny_bundle, as_json):
    good, bad = clips
    files = [good[0], *bad, good[1]]
    result = ser("predict", *files, "--model", tiny_bundle, *(["--json"] if as_json else []))
    assert result.exit_code == 1
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad) and "Traceback" not in result.stderr
    for path, line in zip(bad, errors, strict=True):
        assert re.fullmatch(f"error: {re.escape(path)}: [a-z].+", line)
    assert "no such file" in errors[0]
    if as_json:
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [row["path"] for row in rows] == files
        assert [row["status"] for row in rows] == ["ok", "error", "error", "error", "ok"]
        assert rows[1]["error"] == errors[0].split(": ", 2)[2]
    else:
        assert [line.split(": ")[0] for line in result.stdout.splitlines()] == good


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_model_that_is_not_a_bundle(clips, tmp_path, command):
    args = [clips[0][0]] if command == "predict" else []
    result = ser(command, *args, "--model", tmp_path)
    assert result.exit_code == 2
    assert re.fullmatch(f"error: {re.escape(str(tmp_path))}: not a model bundle .*\n", result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("args", [[], *[[name] for name in sorted(main.commands)]], ids=lambda a: " ".join(a) or "ser")
def test_help(args):
    result = ser(*args, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: ser {' '.join(args)}".rstrip())


def test_version():
    assert ser("--version").stdout == f"ser, version {__version__}\n"


def test_train_print_config():
    result = ser("train", "--print-config", "--epochs", 3, "--set", "augment.noise_std=0.2")
    assert result.exit_code == 0, result.stderr
    expected = config_io.to_dict(TrainConfig(epochs=3))
    expected["augment"]["noise_std"] = 0.2
    assert yaml.safe_load(result.stdout) == expected


def test_train_rejects_unknown_key():
    result = ser("train", "--set", "bogus=1", "--print-config")
    assert result.exit_code == 2
    assert re.fullmatch("error: unknown config key bogus .*\n", result.stderr)
    assert result.stdout == ""


def test_a_command_run_in_process_leaves_the_callers_ray_running(tmp_path, local_ray):
    """A `ser` command stops the Ray it started, not one its caller had up (here the test session's)."""
    result = ser("train", "--resume", tmp_path)
    assert result.exit_code == 2 and local_ray.is_initialized()


def test_train_resume_takes_a_run_folder_and_no_other_option(tmp_path):
    result = ser("train", "--resume", tmp_path)
    assert result.exit_code == 2
    assert re.fullmatch(rf"error: {tmp_path}: not a `ser train` run folder .*\n", result.stderr)
    result = ser("train", "--resume", tmp_path, "--epochs", 3, "--set", "seed=1")
    assert result.exit_code == 2 and result.stderr.startswith("error: --resume goes on under the run's own")
    assert "drop --epochs, --set\n" in result.stderr


def test_tensorflow_imports_without_scikit_learn_and_matplotlib_which_still_import_afterwards(tiny_bundle):
    """A fresh process (as an inference actor is): TensorFlow and Keras come up, load a bundle and score without
    importing scikit-learn or matplotlib, which then import normally for the code that needs them (the `seed`
    split, the reports)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from ser.cli import import_tensorflow_quietly\n"
        "import_tensorflow_quietly()\n"
        "import numpy as np\n"
        "from ser.predict import Predictor\n"
        f"Predictor({str(tiny_bundle)!r}).probabilities(np.zeros((2, 128, 128), np.float32))\n"
        "assert 'tensorflow' in sys.modules and not {'sklearn', 'matplotlib'} & set(sys.modules)\n"
        "from sklearn.model_selection import train_test_split\n"
        "import matplotlib.pyplot\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
