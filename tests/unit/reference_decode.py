"""The decode + feature stage as it was first written, with librosa, the whole file at once. Tests compare
against it.

`ser.audio.decode` now reads, mixes down and resamples block by block, `features.file_features` makes log-mels
a batch of windows at a time, and both compute librosa's trimming and log-mel with numpy alone; for every input
the streaming path accepts, its features must equal these bit for bit, so bundles trained on the one-shot
features stay valid.
"""

from __future__ import annotations

import io

import librosa
import numpy as np
import soundfile as sf
from threadpoolctl import threadpool_limits

from ser import audio, features


def oneshot_decode(data: bytes | str) -> tuple[np.ndarray, int, int, int]:
    """(mono float32 at SAMPLE_RATE, source rate, channels, source frames), reading everything in one call."""
    samples, rate = sf.read(data if isinstance(data, str) else io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != audio.SAMPLE_RATE:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=audio.SAMPLE_RATE, res_type=audio.RESAMPLE_TYPE)
    return np.ascontiguousarray(mono, dtype=np.float32), rate, samples.shape[1], samples.shape[0]


def oneshot_span(mono: np.ndarray) -> tuple[int, int]:
    """The voiced span by librosa.effects.trim on the whole signal."""
    _, (start, end) = librosa.effects.trim(mono, top_db=audio.TRIM_TOP_DB)
    return (int(start), int(end)) if end > start else (0, mono.shape[-1])


def librosa_log_mel_batch(windows: np.ndarray) -> np.ndarray:
    """`features.log_mel_batch` as it was written with librosa.stft and librosa.filters.mel."""
    power = np.abs(librosa.stft(windows, n_fft=features.N_FFT, hop_length=features.HOP_LENGTH)) ** 2
    filters = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=features.N_FFT, n_mels=features.N_MELS)
    with threadpool_limits(1, user_api="blas"):
        mel = np.matmul(filters, power)
    db = 10.0 * np.log10(np.maximum(mel, features.AMIN))
    db -= db.max(axis=(1, 2), keepdims=True)
    return np.maximum(db, -features.TOP_DB).astype(np.float32)


def oneshot_features(data: bytes | str) -> tuple[np.ndarray, np.ndarray]:
    """(features of all windows in one log_mel_batch call, window starts in s)."""
    mono = oneshot_decode(data)[0]
    begin, end = oneshot_span(mono)
    starts = begin + audio.window_starts(end - begin)
    frames = np.stack([audio.pad_or_trim(mono[s : min(s + audio.N_SAMPLES, end)]) for s in starts])
    return librosa_log_mel_batch(frames), starts / audio.SAMPLE_RATE
