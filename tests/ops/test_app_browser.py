"""The Streamlit demo in a real headless Chromium: `ser app` serves it, a clip is uploaded, the prediction shows."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner
from conftest import write_audio

from ser import ravdess
from ser.cli import main

STARTUP_SECONDS = 90
PREDICTION_MS = 180_000  # the first prediction imports TensorFlow and loads the model on a busy CPU
CLIP_SECONDS = 8.0  # long enough for several windows, so the timeline shows
RECORD_MS = 4000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ser app` exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Streamlit not healthy at {url} after {STARTUP_SECONDS} s")


@pytest.fixture(scope="module")
def app_url(tiny_bundle, tmp_path_factory):
    """`ser app` on 127.0.0.1 and a free port, model from $SER_MODEL; stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "streamlit.log"
    env = {**os.environ, "SER_MODEL": str(tiny_bundle), "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    command = [sys.executable, "-c", "from ser.cli import main; main()", "app", "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def shown_prediction(page) -> tuple[str, str, dict[str, float]]:
    """Wait for the result; returns the label, the confidence text and the probability table (in %)."""
    value = page.get_by_test_id("stMetricValue")
    value.first.wait_for(timeout=PREDICTION_MS)
    label, confidence = value.all_inner_texts()
    page.get_by_test_id("stTable").wait_for()
    cells = re.findall(r"^(\w+)\s+([\d.]+)%$", page.get_by_test_id("stTable").inner_text(), flags=re.MULTILINE)
    return label, confidence, {name: float(percent) for name, percent in cells}


def test_upload_shows_label_probabilities_and_timeline(browser, app_url, tiny_bundle, tmp_path):
    from ser.predict import Predictor

    clip = write_audio(tmp_path / "speech.wav", seconds=CLIP_SECONDS, sample_rate=16000)
    expected = Predictor(tiny_bundle).predict_file(str(clip))
    page = browser.new_page(viewport={"width": 1100, "height": 1800})
    page.goto(app_url)
    page.locator("input[type=file]").first.set_input_files(clip)
    label, confidence, table = shown_prediction(page)
    assert label == expected.label
    assert confidence == f"{expected.confidence:.1%}"
    assert table == pytest.approx({name: 100 * p for name, p in expected.probabilities.items()}, abs=0.051)
    page.get_by_text("Timeline").wait_for()
    assert page.get_by_text(f"{len(expected.window_starts)} windows of 3 s").count() == 1
    assert page.get_by_test_id("stVegaLiteChart").count() == 2  # probability bars and the timeline
    page.screenshot(path=tmp_path / "app.png", full_page=True)
    page.close()


def test_recorded_clip_is_predicted(browser, app_url, tmp_path):
    """Chromium's fake microphone (a beep) records through st.audio_input; the clip is labeled like an upload."""
    context = browser.new_context(permissions=["microphone"], viewport={"width": 1100, "height": 1800})
    page = context.new_page()
    page.goto(app_url)
    page.get_by_role("tab", name="Record").click()
    page.get_by_role("button", name="Record").click()
    page.wait_for_timeout(RECORD_MS)
    page.get_by_role("button", name="Stop recording").click()
    label, confidence, table = shown_prediction(page)
    assert label in ravdess.EMOTIONS
    assert list(table) == list(ravdess.EMOTIONS) and abs(sum(table.values()) - 100) < 0.5
    assert confidence == f"{max(table.values()):.1f}%" and table[label] == max(table.values())
    page.screenshot(path=tmp_path / "recorded.png", full_page=True)
    context.close()


def test_app_command_refuses_a_missing_model(tmp_path):
    result = CliRunner().invoke(main, ["app", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not a model bundle" in result.output
