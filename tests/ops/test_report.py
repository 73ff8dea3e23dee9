"""HTML reports rendered in a real headless Chromium: every figure decodes, and the key numbers are on the page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ser import ravdess, report
from ser.cli import main
from ser.evaluate import metrics

from .conftest import ERRORS, _at, write_results

FIRST_RUN = "20240501T020000Z-a1b2c3"


def render(browser, tmp_path, page_html: str) -> tuple[str, list[dict]]:
    """Open the page in Chromium; returns its visible text and, per <img>, its src scheme and decoded width."""
    path = tmp_path / "page.html"
    path.write_text(page_html)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({scheme: e.src.split(',')[0], width: e.naturalWidth, complete: e.complete}))"
    )
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    text = page.inner_text("body")
    page.close()
    return text, images


def assert_figures(images: list[dict], expected: int) -> None:
    assert len(images) == expected
    for image in images:
        assert image["scheme"] == "data:image/png;base64"
        assert image["complete"] and image["width"] > 200


@pytest.fixture(scope="module")
def evaluation_result() -> dict:
    """A real `metrics` result on synthetic probabilities, plus the fields `evaluate` adds."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(ravdess.EMOTIONS), 200)
    probs = rng.dirichlet(np.ones(len(ravdess.EMOTIONS)), 200)
    probs[np.arange(150), labels[:150]] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    result = metrics(probs, labels, ravdess.EMOTIONS)
    result.update(ece_uncalibrated=0.1234, nll_uncalibrated=1.8765, temperature=1.372, protocol="actors",
                  model="ravdess-actors", model_sha256="ab" * 32)
    return result


def test_evaluation_page(browser, tmp_path, evaluation_result):
    text, images = render(browser, tmp_path, report.evaluation_html(evaluation_result, ravdess.EMOTIONS))
    assert_figures(images, 3)  # confusion matrix, per-class bars, reliability diagram
    for number in (evaluation_result["accuracy"], evaluation_result["macro_f1"], evaluation_result["weighted_f1"],
                   evaluation_result["ece"], 0.1234):
        assert f"{number:.4f}" in text
    assert "1.372" in text
    for name in ("accuracy", "macro_f1", "ece_if_calibrated"):
        assert "[{:.3f}, {:.3f}]".format(*evaluation_result["intervals"][name]) in text
    for name, row in evaluation_result["per_class"].items():
        assert f"{name}\t{row['precision']:.3f}\t{row['recall']:.3f}" in text


def expected_numbers(rows: pd.DataFrame, threshold: float = report.LOW_CONFIDENCE) -> list[str]:
    ok = rows[rows["status"] == "ok"]
    return [f"files\t{len(rows)}", f"labeled\t{len(ok)}", f"errors\t{len(rows) - len(ok)}",
            f"low confidence (< {threshold:g})\t{(ok['confidence'] < threshold).sum()}",
            f"mean confidence\t{ok['confidence'].mean():.3f}"]


def test_results_page_latest_per_file(browser, tmp_path, results_dir):
    text, images = render(browser, tmp_path, report.results_html(str(results_dir)))
    assert_figures(images, 3)  # runs over time, label distribution, confidence per label
    latest = pd.read_parquet(results_dir).sort_values("processed_at").drop_duplicates("path", keep="last")
    assert len(latest) == 22
    for line in expected_numbers(latest):
        assert line in text
    assert "latest result of each file over 2 runs" in text
    slowest = latest.loc[latest["processing_s"].idxmax()]
    assert f"Slowest files\npath\tprocessing s\tduration s\tlabel\tconfidence\tstatus\n{slowest['path']}" in text
    assert "audio is silent (peak below -80 dBFS)\t1\t/data/clips/silent-0.wav" in text
    assert f"{FIRST_RUN}\tcompleted\t2024-05-01 02:00\t16\t0\t14\t2\t5.3\t3.00" in text


def test_results_page_one_run(browser, tmp_path, results_dir):
    text, images = render(browser, tmp_path, report.results_html(str(results_dir), FIRST_RUN, threshold=0.3))
    assert_figures(images, 3)
    rows = pd.read_parquet(results_dir, filters=[("run_id", "==", FIRST_RUN)])
    assert len(rows) == 16
    for line in expected_numbers(rows, 0.3):
        assert line in text
    assert f"run {FIRST_RUN}" in text


def test_results_page_of_one_failed_run(browser, tmp_path):
    out = write_results(tmp_path / "out", runs=(("20240603T020000Z-000000", _at(3), [], 1.0),))
    text, images = render(browser, tmp_path, report.results_html(str(out)))
    assert_figures(images, 0)  # one run: no trend to plot; no labeled file: no label figures
    assert "latest result of each file over 1 run ·" in text
    assert "labeled\t0" in text and "errors\t2 (100.0%)" in text and "mean confidence\tn/a" in text
    for reason in ERRORS.values():
        assert f"{reason}\t1" in text


def test_longest_files_without_timings(results_dir):
    rows = pd.read_parquet(results_dir, filters=[("run_id", "==", FIRST_RUN)]).assign(processing_s=np.nan)
    heading, table = report.files_table(rows)
    longest = rows.sort_values("duration_s", ascending=False)["path"]
    assert heading == "Longest files"
    assert "processing s" not in table
    assert table.index(longest.iloc[0]) < table.index(longest.iloc[1])


def test_report_command(tmp_path, results_dir):
    target = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(results_dir), "--html", str(target), "--low-confidence", "0.3"])
    assert result.exit_code == 0, result.output
    assert target.read_text().count("<img ") == 3 and "low confidence (&lt; 0.3)" in target.read_text()
    missing = CliRunner().invoke(main, ["report", str(results_dir), "--html", str(target), "--run", "nope"])
    assert missing.exit_code == 2 and "run 'nope' not found" in missing.output
