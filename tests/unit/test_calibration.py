"""ser.calibration: temperature scaling, ECE, and one temperature applied the same way on every path."""

from __future__ import annotations

import dataclasses

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


def test_weighted_ece_and_nll_equal_repeating_samples(calibrated):
    logits, labels = calibrated
    probs, n = softmax(2.0 * logits[:600]), 600
    weights = np.arange(n) % 3 + 1
    repeated = np.repeat(np.arange(n), weights)
    assert calibration.expected_calibration_error(probs, labels[:n], weights=weights) == pytest.approx(
        calibration.expected_calibration_error(probs[repeated], labels[repeated]), rel=1e-12)
    assert calibration.nll(probs, labels[:n], weights) == pytest.approx(
        calibration.nll(probs[repeated], labels[repeated]), rel=1e-12)
    assert calibration.expected_calibration_error(probs, labels[:n], weights=np.full(n, 0.25)) == pytest.approx(
        calibration.expected_calibration_error(probs, labels[:n]), rel=1e-12)


def test_pooled_temperature_weighs_each_held_out_set(calibrated):
    logits, labels = calibrated
    half = N // 2
    sharp = calibration.HeldOut(3.0 * logits[:half], np.arange(half), labels[:half])  # needs T = 3
    soft = calibration.HeldOut(0.5 * logits[half:], np.arange(N - half), labels[half:])  # needs T = 0.5
    alone = [calibration.fit_pooled_temperature([h]) for h in (sharp, soft)]
    assert alone == [pytest.approx(3.0, rel=0.05), pytest.approx(0.5, rel=0.05)]
    assert alone[0] == calibration.fit_temperature(sharp.window_logits, sharp.file_index, sharp.labels)
    even = calibration.fit_pooled_temperature([sharp, soft])
    leaning = calibration.fit_pooled_temperature([sharp, dataclasses.replace(soft, weight=4.0)])
    assert alone[1] < leaning < even < alone[0]


def test_held_out_check_prefers_a_temperature_pooled_over_more_folds():
    """Five folds of one model class whose true temperature is 2: a temperature fitted on one small fold
    scatters around 2, the one pooled over four folds less, so held-out NLL is lower with the pooled one."""
    from ser.training import held_out_check

    rng = np.random.default_rng(3)
    folds = []
    for _ in range(5):
        logits = rng.normal(0.0, 1.5, (60, 8))
        labels = (softmax(logits).cumsum(axis=1) > rng.random((60, 1))).argmax(axis=1)
        folds.append([calibration.HeldOut(2.0 * logits, np.arange(60), labels)])
    check = held_out_check(folds, [calibration.fit_pooled_temperature(fold) for fold in folds])
    assert check["other_folds_temperature"]["nll"] < check["one_fold_temperature"]["nll"]
    assert 0.0 < check["other_folds_temperature"]["ece"] < 1.0


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
    probs = {}
    for key, temperature in (("nll", 1.5), ("nll_uncalibrated", 1.0)):
        monkeypatch.setattr(predictor, "temperature", temperature)
        probs[key] = np.array([list(predictor.predict_file(p).probabilities.values()) for p in test["path"]])
        assert result[key] == pytest.approx(calibration.nll(probs[key], labels), rel=1e-6)
    # The two NLLs can lie within 0.1% (a random model's near-uniform outputs), but a temperature above 1 pulls
    # every window towards uniform, so the mean confidence falls clearly: the reported one is the calibrated one.
    reported = sum(row["count"] * row["confidence"] for row in result["reliability"] if row["count"]) / result["n"]
    calibrated, uncalibrated = (probs[key].max(axis=1).mean() for key in ("nll", "nll_uncalibrated"))
    assert reported == pytest.approx(calibrated, rel=1e-6)
    assert uncalibrated - calibrated > 1e-3 * calibrated  # seen: 4-20% apart over 8 random models


def test_predictor_probabilities_equal_calibration_file_probabilities(corpus, predictor):
    feats = np.concatenate([features.file_features(str(p))[0] for p in sorted(corpus.glob("*.wav"))[:3]])
    logits = predictor.logits(feats)
    n = len(feats)
    np.testing.assert_array_equal(
        predictor.probabilities(feats), calibration.file_probabilities(logits, np.arange(n), n, predictor.temperature)
    )
    np.testing.assert_allclose(predictor.probabilities(feats), softmax(logits.astype(np.float64) / 1.5), rtol=1e-12)
