"""Evaluation on a protocol's test split: accuracy, F1s, per-class scores, confusion matrix, calibration,
and how much of each headline figure is the test set's sampling noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from ser import calibration, features, ravdess
from ser.predict import Predictor

BOOTSTRAP_RESAMPLES = 2000
INTERVAL_LEVEL = 0.95
BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same interval


def macro_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (resamples, files) label and prediction arrays (sklearn's, zero_division=0)."""
    pairs = labels * n_classes + predicted + (np.arange(len(labels)) * n_classes**2)[:, None]
    counts = np.bincount(pairs.ravel(), minlength=len(labels) * n_classes**2).reshape(-1, n_classes, n_classes)
    true_positives = np.diagonal(counts, axis1=1, axis2=2)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (files predicted as the class + files of the class)
    return (2 * true_positives / np.maximum(counts.sum(axis=1) + counts.sum(axis=2), 1)).mean(axis=1)


def sampling_intervals(probs: np.ndarray, labels: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = INTERVAL_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """How far this test set's size alone moves the headline figures.

    accuracy, macro_f1: percentile bootstrap intervals, test files resampled with replacement.
    ece_if_calibrated: the range of ECE that a perfectly calibrated model with these very confidences would
    show on this many files (each file's hit drawn with its confidence as probability: consistency
    resampling, Broecker & Smith 2007). ECE is biased upwards on few files, so a bootstrap interval of it
    need not even hold the estimate; an ECE inside this range is indistinguishable from perfect calibration.
    None of them covers the spread between training runs or (one speaker's files not being independent)
    the uncertainty about voices the test set lacks.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), (resamples, len(labels)))
    chosen, predicted = labels[draws], probs.argmax(axis=1)[draws]
    confidence = np.broadcast_to(probs.max(axis=1), draws.shape)
    statistics = {
        "accuracy": (chosen == predicted).mean(axis=1),
        "macro_f1": macro_f1(chosen, predicted, probs.shape[1]),
        "ece_if_calibrated": calibration.ece_rows(confidence, rng.random(draws.shape) < confidence),
    }
    tails = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return {
        "level": level,
        "resamples": resamples,
        **{name: np.percentile(values, tails).tolist() for name, values in statistics.items()},
    }


def interval(result: dict, name: str) -> str:
    """One of result["intervals"] as printed: "[0.656, 0.743]"."""
    low, high = result["intervals"][name]
    return f"[{low:.3f}, {high:.3f}]"


def metrics(probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict:
    """All reported metrics for calibrated file probabilities and integer labels."""
    predicted = probs.argmax(axis=1)
    ids = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    return {
        "n": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, labels=ids, average="weighted", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=ids).tolist(),
        "ece": calibration.expected_calibration_error(probs, labels),
        "nll": calibration.nll(probs, labels),
        "reliability": calibration.reliability(probs, labels),
        "intervals": sampling_intervals(probs, labels),
    }


def evaluate(predictor: Predictor, data_dir: str | Path, protocol: str) -> dict:
    """Score the bundle on the test split of `protocol`, with its calibrated temperature and without."""
    table = ravdess.index(data_dir)
    test = table[ravdess.split(table, protocol) == "test"].reset_index(drop=True)
    feats, owners = [], []
    for row, path in enumerate(test["path"]):
        window_feats, _, _ = features.file_features(path)
        feats.append(window_feats)
        owners.extend([row] * len(window_feats))
    logits = predictor.logits(np.concatenate(feats))
    labels = test["emotion"].map(predictor.classes.index).to_numpy()
    owners = np.asarray(owners)
    result = metrics(
        calibration.file_probabilities(logits, owners, len(test), predictor.temperature), labels, predictor.classes
    )
    uncalibrated = calibration.file_probabilities(logits, owners, len(test), 1.0)
    result.update(
        {
            "ece_uncalibrated": calibration.expected_calibration_error(uncalibrated, labels),
            "nll_uncalibrated": calibration.nll(uncalibrated, labels),
            "temperature": predictor.temperature,
            "protocol": protocol,
            "model": predictor.bundle.name,
            "model_sha256": predictor.bundle.sha256,
        }
    )
    return result
