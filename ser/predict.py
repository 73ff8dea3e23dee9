"""Inference: features -> calibrated class probabilities, windows -> one label per file.

`Predictor` is what `ser predict`, `ser evaluate`, the labeling job's actors and the web demo all use:
the same normalization, the same temperature, the same window aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser import audio, bundle, features

DEFAULT_BATCH_SIZE = 64


def normalize(feats: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardize log-mels with training-set statistics and add the channel axis the model expects."""
    return ((feats - mean) / std).astype(np.float32)[..., None]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 so rows sum to 1 within 1e-12."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def mean_by_file(window_probs: np.ndarray, file_index: np.ndarray, n_files: int) -> np.ndarray:
    """Average window probabilities per file: (n_windows, C) + owner index -> (n_files, C)."""
    sums = np.zeros((n_files, window_probs.shape[1]))
    np.add.at(sums, file_index, window_probs)
    counts = np.bincount(file_index, minlength=n_files)[:, None]
    return sums / np.maximum(counts, 1)


@dataclass
class FilePrediction:
    """One file's result: the label, its calibrated confidence, all class probabilities, and per window."""

    path: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    window_starts: np.ndarray
    window_probabilities: np.ndarray
    info: audio.AudioInfo

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "n_windows": len(self.window_starts),
            "duration_s": round(self.info.duration_s, 3),
        }


class Predictor:
    """A loaded bundle ready for batched inference."""

    def __init__(
        self, model_dir: str | Path | bundle.Bundle = bundle.DEFAULT_MODEL, batch_size: int = DEFAULT_BATCH_SIZE
    ):
        import tensorflow as tf

        self.bundle = model_dir if isinstance(model_dir, bundle.Bundle) else bundle.load(model_dir)
        self.classes = self.bundle.classes
        self.temperature = self.bundle.temperature
        self.batch_size = batch_size
        shape = (None, *features.FEATURE_SHAPE, 1)
        self._logits = tf.function(
            lambda x: self.bundle.model(x, training=False),
            input_signature=[tf.TensorSpec(shape, tf.float32)],
            reduce_retracing=True,
        )

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """(n, 128, 128) log-mels -> (n, n_classes) uncalibrated logits, in batches of batch_size."""
        x = normalize(feats, self.bundle.mean, self.bundle.std)
        out = [self._logits(x[i : i + self.batch_size]).numpy() for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, feats: np.ndarray) -> np.ndarray:
        """(n, 128, 128) log-mels -> (n, n_classes) calibrated probabilities."""
        return softmax(self.logits(feats), self.temperature)

    def predict_features(
        self, feats: np.ndarray, starts: np.ndarray, info: audio.AudioInfo, path: str
    ) -> FilePrediction:
        """One file's windows -> its prediction (mean of window probabilities)."""
        window_probs = self.probabilities(feats)
        return self._file_prediction(path, window_probs, starts, info)

    def _file_prediction(
        self, path: str, window_probs: np.ndarray, starts: np.ndarray, info: audio.AudioInfo
    ) -> FilePrediction:
        probs = window_probs.mean(axis=0)
        best = int(probs.argmax())
        return FilePrediction(
            path=path,
            label=self.classes[best],
            confidence=float(probs[best]),
            probabilities=dict(zip(self.classes, map(float, probs), strict=True)),
            window_starts=starts,
            window_probabilities=window_probs,
            info=info,
        )

    def predict_file(self, data: bytes | str, name: str = "") -> FilePrediction:
        """Bytes or a path -> FilePrediction; raises audio.DecodeError for unusable input."""
        feats, starts, info = features.file_features(data)
        return self.predict_features(feats, starts, info, name or str(data))

    def predict_files(self, paths: Iterable[str]) -> Iterable[FilePrediction | audio.DecodeError]:
        """Predict many local files, batching windows across files; yields a result or the error per path."""
        pending: list[tuple[str, np.ndarray, np.ndarray, audio.AudioInfo]] = []
        n_windows = 0
        for path in paths:
            try:
                feats, starts, info = features.file_features(str(path))
            except audio.DecodeError as exc:
                yield from self._flush(pending)
                pending, n_windows = [], 0
                yield audio.DecodeError(f"{path}: {exc}")
                continue
            pending.append((str(path), feats, starts, info))
            n_windows += len(feats)
            if n_windows >= self.batch_size:
                yield from self._flush(pending)
                pending, n_windows = [], 0
        yield from self._flush(pending)

    def _flush(self, pending: list) -> Iterable[FilePrediction]:
        if not pending:
            return
        window_probs = self.probabilities(np.concatenate([feats for _, feats, _, _ in pending]))
        offset = 0
        for path, feats, starts, info in pending:
            yield self._file_prediction(path, window_probs[offset : offset + len(feats)], starts, info)
            offset += len(feats)
