"""Temperature scaling (Guo et al. 2017) and expected calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from ser.predict import mean_by_file, softmax

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def nll(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean (optionally weighted) negative log-likelihood of the true class."""
    return float(np.average(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)), weights=weights))


def file_probabilities(
    window_logits: np.ndarray, file_index: np.ndarray, n_files: int, temperature: float
) -> np.ndarray:
    """Calibrated per-file probabilities: softmax(logits / T) per window, averaged per file."""
    return mean_by_file(softmax(window_logits, temperature), file_index, n_files)


@dataclass(frozen=True)
class HeldOut:
    """Window logits of files a model never trained on, the file (0..n-1) owning each window, the files'
    labels, and the weight of each file in a pooled fit."""

    window_logits: np.ndarray
    file_index: np.ndarray
    labels: np.ndarray
    weight: float = 1.0

    def probabilities(self, temperature: float) -> np.ndarray:
        return file_probabilities(self.window_logits, self.file_index, len(self.labels), temperature)


def fit_temperature(window_logits: np.ndarray, file_index: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimizing file-level NLL on held-out (validation) data."""
    return fit_pooled_temperature([HeldOut(window_logits, file_index, labels)])


def pool(scored: list[tuple[HeldOut, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out sets, each at its own temperature, as one: file probabilities, labels and file weights."""
    probs = np.concatenate([held.probabilities(t) for held, t in scored])
    labels = np.concatenate([held.labels for held, _ in scored])
    weights = np.concatenate([np.full(len(held.labels), held.weight) for held, _ in scored])
    return probs, labels, weights


def fit_pooled_temperature(held_out: list[HeldOut]) -> float:
    """One temperature minimizing the weighted mean file NLL over several held-out sets (e.g. voice folds,
    each scored by the models that never heard it)."""

    def loss(log_t: float) -> float:
        return nll(*pool([(held, float(np.exp(log_t))) for held in held_out]))

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def confidence_bin(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin of each confidence (a confidence of exactly 1 falls in the last bin)."""
    return np.minimum((confidence * n_bins).astype(int), n_bins - 1)


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins: each bin's bounds, count, mean confidence and accuracy."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = confidence_bin(confidence, n_bins)
    rows = []
    for b in range(n_bins):
        members = bins == b
        rows.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": int(members.sum()),
                "confidence": float(confidence[members].mean()) if members.any() else None,
                "accuracy": float(correct[members].mean()) if members.any() else None,
            }
        )
    return rows


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS, weights: np.ndarray | None = None
) -> float:
    """ECE: the gap |accuracy - confidence| of each bin, weighted by the share of samples (or of the sample
    weights) in it."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    rows_weights = None if weights is None else np.asarray(weights, dtype=np.float64)[None]
    return float(ece_rows(confidence[None], correct[None], n_bins, rows_weights)[0])


def ece_rows(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS, weights: np.ndarray | None = None
) -> np.ndarray:
    """ECE of each row of (resamples, files) top-class confidences and hits (and optional file weights): per
    bin, |sum of weighted confidences - hits|, over the total weight of the row."""
    rows = len(confidence)
    weights = np.ones(confidence.shape) if weights is None else np.broadcast_to(weights, confidence.shape)
    bins = confidence_bin(confidence, n_bins) + (np.arange(rows) * n_bins)[:, None]
    gaps = np.bincount(bins.ravel(), weights=(weights * (confidence - correct)).ravel(), minlength=rows * n_bins)
    return np.abs(gaps.reshape(rows, n_bins)).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)
