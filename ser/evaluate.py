"""Evaluation on a protocol's test split: accuracy, F1s, per-class scores, confusion matrix, calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from ser import calibration, features, ravdess
from ser.predict import Predictor


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
