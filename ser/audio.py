"""Audio input: decode anything soundfile reads to mono float32 at one rate, trim, and cut into windows.

Every path into the model (training, `ser predict`, the labeling job, the web demo) goes through
`decode` -> `windows` here and `features.log_mel_batch` next door, so they cannot drift apart.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import librosa
import numpy as np
import soundfile as sf

# Hard-coded audio hyperparameters: the model was trained on exactly these.
SAMPLE_RATE = 22050
CLIP_SECONDS = 3
WINDOW_HOP_SECONDS = 1.5  # long recordings: 3 s windows every 1.5 s, the last one aligned to the end
TRIM_TOP_DB = 40  # leading/trailing audio more than 40 dB below the peak frame counts as silence
SILENCE_PEAK = 10 ** (-80 / 20)  # a peak under -80 dBFS is treated as no signal at all
RESAMPLE_TYPE = "soxr_hq"

N_SAMPLES = CLIP_SECONDS * SAMPLE_RATE  # 66150 samples in a window
WINDOW_HOP = int(WINDOW_HOP_SECONDS * SAMPLE_RATE)  # 33075 samples between window starts
assert WINDOW_HOP * 2 == N_SAMPLES, "windows overlap by exactly half"


class DecodeError(ValueError):
    """The input is not audio this project can use; the message is one line, fit for a user."""


@dataclass(frozen=True)
class AudioInfo:
    """What the file said about itself before we resampled it."""

    sample_rate: int
    channels: int
    duration_s: float


def decode(data: bytes | str, name: str = "") -> tuple[np.ndarray, AudioInfo]:
    """Decode file bytes (or a local path) to mono float32 at SAMPLE_RATE.

    Raises DecodeError for empty, unreadable, zero-length, non-finite or silent input.
    """
    label = name or (data if isinstance(data, str) else "<bytes>")
    if isinstance(data, bytes | bytearray) and len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if isinstance(data, str) and not os.path.isfile(data):
        raise DecodeError("is a directory" if os.path.isdir(data) else "no such file")
    source = data if isinstance(data, str) else io.BytesIO(data)
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = getattr(exc, "error_string", None) or _first_line(exc)  # libsndfile's reason, without the repr
        raise DecodeError(f"not a readable audio file ({reason})") from None
    except OSError as exc:
        raise DecodeError(f"cannot read {label}: {exc.strerror or exc}") from None
    channels = samples.shape[1]
    if samples.shape[0] == 0:
        raise DecodeError("audio has zero samples")
    info = AudioInfo(sample_rate=int(rate), channels=int(channels), duration_s=samples.shape[0] / rate)
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise DecodeError("audio contains NaN or infinite samples")
    if np.abs(mono).max() < SILENCE_PEAK:
        raise DecodeError("audio is silent (peak below -80 dBFS)")
    if rate != SAMPLE_RATE:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE, res_type=RESAMPLE_TYPE)
    return np.ascontiguousarray(mono, dtype=np.float32), info


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def voiced_span(audio: np.ndarray) -> tuple[int, int]:
    """[start, end) sample span left after trimming audio more than TRIM_TOP_DB below the loudest frame."""
    _, (start, end) = librosa.effects.trim(audio, top_db=TRIM_TOP_DB)
    return (int(start), int(end)) if end > start else (0, audio.shape[-1])


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or cut to exactly `length` samples."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])])


def window_starts(n_samples: int) -> np.ndarray:
    """Start sample of each window: one for short audio, else every WINDOW_HOP plus one ending at the end."""
    if n_samples <= N_SAMPLES:
        return np.zeros(1, dtype=np.int64)
    n_regular = math.ceil((n_samples - N_SAMPLES) / WINDOW_HOP)
    starts = np.arange(n_regular, dtype=np.int64) * WINDOW_HOP
    return np.append(starts, n_samples - N_SAMPLES)


def windows(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trim silence, then cut into (n_windows, N_SAMPLES) windows; also return their start times in seconds."""
    begin, end = voiced_span(audio)
    starts = begin + window_starts(end - begin)
    frames = np.stack([pad_or_trim(audio[s : min(s + N_SAMPLES, end)]) for s in starts])
    return frames, starts / SAMPLE_RATE
