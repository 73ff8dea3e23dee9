"""The feature stage: 3 s windows -> 128x128 log-mel spectrograms (dB relative to each window's peak).

The exact contract lives here and nowhere else. `log_mel_batch` is the only function that makes features;
one clip is a batch of one, so every caller gets bit-identical values for the same window. The values are
librosa's (`stft`, `filters.mel`) bit for bit, computed with numpy alone: importing librosa's core costs a
worker ~1.8 s of CPU (scipy.signal, numba) before its first clip.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
from threadpoolctl import ThreadpoolController

from ser import audio

N_FFT = 2048
HOP_LENGTH = 520  # chosen so that a 3 s window gives exactly 128 centred frames (hop 512 would give 130)
N_MELS = 128
TOP_DB = 80.0  # dynamic range kept below each window's peak
AMIN = 1e-10  # power floor before the log
FEATURE_BATCH_WINDOWS = 32  # windows per log_mel_batch call in file_features: ~35 MB of working memory

# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
MEL_LINEAR_HZ = 200.0 / 3  # Hz per mel below MEL_BREAK_HZ
MEL_BREAK_HZ = 1000.0
MEL_BREAK = MEL_BREAK_HZ / MEL_LINEAR_HZ  # 15 mels
MEL_LOG_STEP = np.log(6.4) / 27.0  # log(Hz) per mel above the break

N_FRAMES = 1 + audio.N_SAMPLES // HOP_LENGTH
FEATURE_SHAPE = (N_MELS, N_FRAMES)
assert FEATURE_SHAPE == (128, 128), f"feature contract broken: {FEATURE_SHAPE}"


def feature_config() -> dict:
    """Everything that determines the features, for provenance in bundles and outputs."""
    return {
        "sample_rate": audio.SAMPLE_RATE,
        "clip_seconds": audio.CLIP_SECONDS,
        "window_hop_seconds": audio.WINDOW_HOP_SECONDS,
        "trim_top_db": audio.TRIM_TOP_DB,
        "resample_type": audio.RESAMPLE_TYPE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "top_db": TOP_DB,
        "shape": list(FEATURE_SHAPE),
    }


def feature_config_hash(config: dict | None = None) -> str:
    """Short stable hash of a feature config (the current one by default)."""
    blob = json.dumps(config or feature_config(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hz_to_mel(hz: float) -> float:
    """A frequency on Slaney's mel scale."""
    return MEL_BREAK + np.log(hz / MEL_BREAK_HZ) / MEL_LOG_STEP if hz >= MEL_BREAK_HZ else hz / MEL_LINEAR_HZ


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Slaney mels back to Hz."""
    hz = MEL_LINEAR_HZ * mels
    above = mels >= MEL_BREAK
    hz[above] = MEL_BREAK_HZ * np.exp(MEL_LOG_STEP * (mels[above] - MEL_BREAK))
    return hz


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """Slaney mel filterbank, (N_MELS, 1 + N_FFT // 2), float32: librosa.filters.mel(sr, n_fft, n_mels).

    Triangles between N_MELS + 2 edges evenly spaced in mels from 0 Hz to Nyquist, each scaled to unit area.
    """
    bin_hz = np.fft.rfftfreq(N_FFT, d=1.0 / audio.SAMPLE_RATE)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(audio.SAMPLE_RATE / 2), N_MELS + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, bin_hz)
    filters = np.zeros((N_MELS, 1 + N_FFT // 2), np.float32)
    for i in range(N_MELS):
        filters[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return filters


@lru_cache(maxsize=1)
def stft_window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples, float64 (scipy.signal.get_window("hann"), as librosa.stft uses)."""
    return 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, N_FFT + 1))[:-1]


def power_spectrum(windows: np.ndarray) -> np.ndarray:
    """(batch, N_SAMPLES) float32 -> (batch, N_FRAMES, 1 + N_FFT // 2) float32 |STFT|^2.

    librosa.stft's values: frames centred on every HOP_LENGTH-th sample with zero padding, the Hann window and
    the transform in float64, rounded to complex64.
    """
    padded = np.pad(windows, ((0, 0), (N_FFT // 2, N_FFT // 2)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)[:, ::HOP_LENGTH]
    power = np.empty((len(windows), N_FRAMES, 1 + N_FFT // 2), np.float32)
    for i, window_frames in enumerate(frames):  # a window at a time: its float64 transform (2 MB) stays in cache
        power[i] = np.abs(np.fft.rfft(window_frames * stft_window()).astype(np.complex64)) ** 2
    return power


@lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def log_mel_batch(windows: np.ndarray) -> np.ndarray:
    """(batch, N_SAMPLES) float32 windows -> (batch, N_MELS, N_FRAMES) float32 log-mel in [-TOP_DB, 0] dB."""
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim != 2 or windows.shape[1] != audio.N_SAMPLES:
        raise ValueError(f"expected windows of shape (batch, {audio.N_SAMPLES}), got {windows.shape}")
    power = power_spectrum(windows)
    # One BLAS thread: a threaded float32 matmul sums in an order set by the thread count (1 in a Ray worker,
    # all cores in a driver), which changed the features' last bits from one path to another.
    with _threadpools().limit(limits=1, user_api="blas"):
        mel = np.matmul(mel_filters(), power.transpose(0, 2, 1))
    db = 10.0 * np.log10(np.maximum(mel, AMIN))
    db -= db.max(axis=(1, 2), keepdims=True)
    return np.maximum(db, -TOP_DB).astype(np.float32)


def log_mel(window: np.ndarray) -> np.ndarray:
    """One (N_SAMPLES,) window -> (N_MELS, N_FRAMES); the same code as a batch of one."""
    return log_mel_batch(window[None, :])[0]


def file_features(
    data: bytes | str, perturbation: audio.Perturbation = audio.Perturbation()
) -> tuple[np.ndarray, np.ndarray, audio.AudioInfo]:
    """Bytes or path -> (features (n_windows, N_MELS, N_FRAMES), window starts in s, AudioInfo).

    The single entry used by training, `ser predict` and the labeling job. Windows are cut and turned into
    log-mels FEATURE_BATCH_WINDOWS at a time (each window's features do not depend on its batch), so a long
    recording never holds all its windows or STFTs at once. `perturbation` is training's augmentation hook:
    the decoded audio is speed- or pitch-perturbed before trimming; inference always leaves it as it is.
    """
    samples, info = audio.decode(data)
    samples = perturbation.apply(samples)
    starts, end = audio.voiced_window_starts(samples)
    feats = np.empty((len(starts), *FEATURE_SHAPE), np.float32)
    for first in range(0, len(starts), FEATURE_BATCH_WINDOWS):
        batch = starts[first : first + FEATURE_BATCH_WINDOWS]
        feats[first : first + len(batch)] = log_mel_batch(audio.cut_windows(samples, batch, end))
    return feats, starts / audio.SAMPLE_RATE, info
