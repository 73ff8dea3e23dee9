"""ser.calibration: temperature scaling, ECE, and one temperature applied the same way on every path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_ravdess_like

from ser import calibration, evaluate, features, ravdess
from ser.predict import Predictor, softmax

N = 20_000


@pytest.fixture(scope="module")
def calibrated():
    """Logits whose softmax is the true class distribution: labels are drawn from it."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.5, (N, 8))
    probs = softmax(logits)
    labels = (probs.cumsum(axis=1) > rng.random((N, 1))).argmax(axis=1)
    return logits, labels


def test_temperature_scaling_undoes_over_confidence(calibrated):
    logits, labels = calibrated
    over = 3.0 * logits
    temperature = calibration.fit_temperature(over, np.arange(N), labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    before = calibration.nll(softmax(over), labels)
    after = calibration.nll(calibration.file_probabilities(over, np.arange(N), N, temperature), labels)
    assert after < before - 0.3
    assert after == pytest.approx(calibration.nll(softmax(logits), labels), abs=0.01)


def test_fit_temperature_on_well_calibrated_logits_is_about_one(calibrated):
    logits, labels = calibrated
    assert calibration.fit_temperature(logits, np.arange(N), labels) == pytest.approx(1.0, abs=0.05)


def test_ece_small_when_calibrated_large_when_over_confident(calibrated):
    logits, labels = calibrated
    assert calibration.expected_calibration_error(softmax(logits), labels) < 0.02
    assert calibration.expected_calibration_error(softmax(3.0 * logits), labels) > 0.15


def test_reliability_bins_count_every_sample(calibrated):
    logits, labels = calibrated
    rows = calibration.reliability(softmax(logits), labels)
    assert len(rows) == calibration.ECE_BINS and sum(r["count"] for r in rows) == N
    assert rows[0]["lower"] == 0.0 and rows[-1]["upper"] == 1.0


def test_file_probabilities_average_windows_per_file():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    got = calibration.file_probabilities(logits, np.array([0, 0, 1]), 2, temperature=2.0)
    window = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, [window[:2].mean(axis=0), window[2]], rtol=1e-15)


# ---------------------------------------------------------------- one temperature, every path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_ravdess_like(root, n=24, seconds=4.0)
    return root


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    predictor = Predictor(tiny_bundle)
    assert predictor.temperature == 1.5
    return predictor


def test_predictor_and_evaluation_apply_the_same_temperature(corpus, predictor, monkeypatch):
    table = ravdess.index(corpus)
    test = table[ravdess.split(table, "actors") == "test"]
    labels = test["emotion"].map(ravdess.EMOTIONS.index).to_numpy()
    result = evaluate.evaluate(predictor, corpus, "actors")
    assert result["n"] == len(test) == 4 and result["temperature"] == 1.5
    for key, temperature in (("nll", 1.5), ("nll_uncalibrated", 1.0)):
        monkeypatch.setattr(predictor, "temperature", temperature)
        probs = np.array([list(predictor.predict_file(p).probabilities.values()) for p in test["path"]])
        assert result[key] == pytest.approx(calibration.nll(probs, labels), rel=1e-6)
    assert result["nll"] != pytest.approx(result["nll_uncalibrated"], rel=1e-3)


def test_predictor_probabilities_equal_calibration_file_probabilities(corpus, predictor):
    feats = np.concatenate([features.file_features(str(p))[0] for p in sorted(corpus.glob("*.wav"))[:3]])
    logits = predictor.logits(feats)
    n = len(feats)
    np.testing.assert_array_equal(
        predictor.probabilities(feats), calibration.file_probabilities(logits, np.arange(n), n, predictor.temperature)
    )
    np.testing.assert_allclose(predictor.probabilities(feats), softmax(logits.astype(np.float64) / 1.5), rtol=1e-12)
