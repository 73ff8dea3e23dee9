"""ser.evaluate: the vectorized resampled statistics equal the reported metrics, and the intervals behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_ravdess_like
from sklearn.metrics import f1_score

from ser import calibration, evaluate
from ser.cli import main
from ser.predict import softmax
from ser.ravdess import EMOTIONS

N_CLASSES = len(EMOTIONS)


def predictions(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top class is right for about `accuracy` of n files, with a spread of confidences."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    probs = rng.dirichlet(np.ones(N_CLASSES), n)
    right = rng.random(n) < accuracy
    probs[right, labels[right]] += 1.0
    return probs / probs.sum(axis=1, keepdims=True), labels


def test_bootstrap_statistics_equal_the_reported_metrics_row_by_row():
    rows = [predictions(150, accuracy, seed) for seed, accuracy in enumerate((0.2, 0.6, 0.95))]
    rows.append((np.eye(N_CLASSES)[np.zeros(150, int)], np.r_[np.zeros(140, int), np.ones(10, int)]))  # absent classes
    labels = np.stack([row_labels for _, row_labels in rows])
    predicted = np.stack([probs.argmax(axis=1) for probs, _ in rows])
    confidence = np.stack([probs.max(axis=1) for probs, _ in rows])
    ids = np.arange(N_CLASSES)
    expected_f1 = [f1_score(truth, guess, labels=ids, average="macro", zero_division=0)
                   for truth, guess in zip(labels, predicted, strict=True)]
    np.testing.assert_allclose(evaluate.macro_f1(labels, predicted, N_CLASSES), expected_f1, rtol=1e-12)
    expected_ece = [calibration.expected_calibration_error(probs, row_labels) for probs, row_labels in rows]
    np.testing.assert_allclose(calibration.ece_rows(confidence, labels == predicted), expected_ece, rtol=1e-9)


def test_intervals_hold_the_estimate_narrow_with_more_files_and_repeat():
    small, large = predictions(200, 0.7), predictions(5000, 0.7)
    widths = {}
    for name, (probs, labels) in {"small": small, "large": large}.items():
        result = evaluate.metrics(probs, labels, EMOTIONS)
        intervals = result["intervals"]
        assert intervals["level"] == 0.95 and intervals["resamples"] == evaluate.BOOTSTRAP_RESAMPLES
        for key in ("accuracy", "macro_f1"):
            low, high = intervals[key]
            assert low < result[key] < high, (name, key, low, result[key], high)
        low, high = intervals["accuracy"]
        widths[name] = high - low
        # binomial sampling noise: the 95% interval of a proportion is about 2 x 1.96 standard errors wide
        assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / len(labels)), rel=0.25)
    assert widths["large"] < widths["small"] / 3  # sqrt(25) = 5 times narrower, within noise
    assert evaluate.sampling_intervals(*small) == evaluate.sampling_intervals(*small)  # a fixed seed


def test_a_calibrated_models_ece_is_within_chance_and_an_over_confident_ones_is_not():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 1.5, (400, N_CLASSES))
    calibrated = softmax(logits)
    labels = (calibrated.cumsum(axis=1) > rng.random((400, 1))).argmax(axis=1)  # drawn from the probabilities
    over_confident = softmax(logits * 3.0)
    for probs, inside in ((calibrated, True), (over_confident, False)):
        low, high = evaluate.sampling_intervals(probs, labels)["ece_if_calibrated"]
        assert (low <= calibration.expected_calibration_error(probs, labels) <= high) is inside, (low, high)


def test_ser_evaluate_prints_and_records_the_intervals(tmp_path, tiny_bundle):
    write_ravdess_like(tmp_path, n=24, seconds=2.0)
    args = ["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path), "--protocol", "actors"]
    as_json = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    result = json.loads(as_json.stdout)
    assert result["n"] == 4
    assert set(result["intervals"]) == {"level", "resamples", "accuracy", "macro_f1", "ece_if_calibrated"}
    table = CliRunner().invoke(main, args, catch_exceptions=False).stdout
    low, high = result["intervals"]["accuracy"]
    assert f"accuracy {result['accuracy']:.4f} [{low:.3f}, {high:.3f}]" in table
    assert "[low, high]: 95% of what 4 test files give by chance (2000 resamples" in table
