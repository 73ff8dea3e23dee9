"""Audio input: decode anything soundfile reads to mono float32 at one rate, trim, and cut into windows.

Every path into the model (training, `ser predict`, the labeling job, the web demo) goes through
`decode` -> `windows` here and `features.log_mel_batch` next door, so they cannot drift apart.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

# Hard-coded audio hyperparameters: the model was trained on exactly these.
SAMPLE_RATE = 22050
CLIP_SECONDS = 3
WINDOW_HOP_SECONDS = 1.5  # long recordings: 3 s windows every 1.5 s, the last one aligned to the end
TRIM_TOP_DB = 40  # leading/trailing audio more than 40 dB below the peak frame counts as silence
SILENCE_PEAK = 10 ** (-80 / 20)  # a peak under -80 dBFS is treated as no signal at all
RESAMPLE_TYPE = "soxr_hq"
TRIM_FRAME_LENGTH = 2048  # librosa.effects.trim's frame and hop for the RMS it trims by
TRIM_HOP_LENGTH = 512
TRIM_RMS_FLOOR = 1e-5  # librosa.amplitude_to_db's floor for the frame RMS

# Streaming. Files up to ONESHOT_MAX_SAMPLES source samples (frames x channels; 64 MiB of float32, e.g. 3 min
# of 44.1 kHz stereo) are read in one call, as before streaming existed; larger ones BLOCK_SAMPLES at a time.
# WAV, FLAC and Ogg decode to the same bits either way, but libsndfile 1.2.2's MP3 decoder depends on the read
# size (last-bit differences, and up to one frame zeroed after a read that ends in digital silence), so short
# files keep the one-shot read and with it their exact features. The choice depends on the file alone, so every
# caller (training, predict, labeling) still gets identical features.
ONESHOT_MAX_SAMPLES = 1 << 24
BLOCK_SAMPLES = 1 << 20  # source samples read at a time beyond that: 4 MiB of float32, whatever the layout
TRIM_CHUNK_FRAMES = 4096  # RMS frames computed at a time when trimming: 32 MiB of float32

# Limits, so that no input can exhaust a worker's memory or time; each has its own error.
MAX_SECONDS = 3 * 3600  # longer recordings are refused; at the limit a decode peaks at ~2 GB (mono 22.05 kHz
                        # float32 is 0.95 GB, briefly twice while its blocks are joined; features 0.47 GB)
MIN_SOURCE_RATE = 1000  # below, a "recording" holds no speech band; it also caps resampling at 22x the input
MAX_SOURCE_RATE = 768_000  # the highest rate audio interfaces use
# Float files written at integer scale (up to int32) are fine; far beyond, the STFT's power overflows float32
# and the features turn NaN.
MAX_PEAK = 2.0**32

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


def decode(data: bytes | str) -> tuple[np.ndarray, AudioInfo]:
    """Decode file bytes (or a local path) to mono float32 at SAMPLE_RATE.

    Long files stream: BLOCK_SAMPLES at a time are read, mixed down and resampled, so memory follows the mono
    output, not the source's rate, channels or sample format (a 1-hour 96 kHz 8-channel file never exists
    decoded). soxr resamples a stream exactly like one array; see ONESHOT_MAX_SAMPLES for the read. Raises
    DecodeError for empty, unreadable, zero-length, out-of-range, too long, non-finite or silent input; its
    message never contains the path.
    """
    source = _source(data)
    try:
        try:
            sound = sf.SoundFile(source, closefd=False)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise DecodeError(f"not a readable audio file ({_libsndfile_reason(exc)})") from None
        with sound:
            rate, channels = int(sound.samplerate), int(sound.channels)
            if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
                raise DecodeError(f"unsupported sample rate {rate} Hz (expected {MIN_SOURCE_RATE}-"
                                  f"{MAX_SOURCE_RATE} Hz)")
            mono, n_frames = _mono_resampled(sound, rate, channels)
    finally:
        if isinstance(source, int):
            os.close(source)
    return mono, AudioInfo(sample_rate=rate, channels=channels, duration_s=n_frames / rate)


def _source(data: bytes | str) -> int | io.BytesIO:
    """What soundfile reads: the bytes, or a descriptor of the regular local file at path `data`."""
    if not isinstance(data, str):
        if len(data) == 0:
            raise DecodeError("empty file (0 bytes)")
        return io.BytesIO(data)
    try:
        fd = os.open(data, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named x.wav must not block the worker
    except OSError as exc:
        raise DecodeError(f"cannot read: {_os_reason(exc)}") from None
    facts = os.fstat(fd)
    if stat.S_ISREG(facts.st_mode) and facts.st_size > 0:
        return fd
    os.close(fd)
    if stat.S_ISDIR(facts.st_mode):
        raise DecodeError("is a directory")
    raise DecodeError("empty file (0 bytes)" if stat.S_ISREG(facts.st_mode) else "not a regular file")


def _mono_resampled(sound: sf.SoundFile, rate: int, channels: int) -> tuple[np.ndarray, int]:
    """The whole stream as mono float32 at SAMPLE_RATE, and the number of source frames.

    Each block is mixed down, checked and fed to one soxr stream as it arrives.
    """
    resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                      quality=RESAMPLE_TYPE)
    out: list[np.ndarray] = []
    n_frames, peak = 0, 0.0
    for block in _blocks(sound, channels):
        with np.errstate(over="ignore", invalid="ignore"):  # absurd samples are refused just below
            mono = block.mean(axis=1)
        if not np.isfinite(mono).all():
            raise DecodeError("audio contains NaN or infinite samples")
        peak = max(peak, float(np.abs(mono).max()))
        if peak > MAX_PEAK:
            raise DecodeError(f"audio samples out of range (peak {peak:.3g}; audio is expected within +-1)")
        n_frames += len(mono)
        if n_frames > MAX_SECONDS * rate:
            raise DecodeError(f"audio is longer than {MAX_SECONDS / 3600:g} h, the limit")
        out.append(mono if resampler is None else resampler.resample_chunk(mono))
    if n_frames == 0:
        raise DecodeError("audio has zero samples")
    if peak < SILENCE_PEAK:
        raise DecodeError("audio is silent (peak below -80 dBFS)")
    if resampler is None:
        return np.concatenate(out), n_frames
    out.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    # librosa.resample's length, which the one-shot decode had: ceil(n * ratio)
    size = math.ceil(n_frames * SAMPLE_RATE / rate)
    return pad_or_trim(np.concatenate(out), size), n_frames


def _blocks(sound: sf.SoundFile, channels: int) -> Iterator[np.ndarray]:
    """The file's samples as float32 (frames, channels) blocks: one read up to ONESHOT_MAX_SAMPLES, exactly as
    `sf.read` does (seek to 0, read all), else BLOCK_SAMPLES at a time."""
    oneshot = sound.frames * channels <= ONESHOT_MAX_SAMPLES
    block_frames = sound.frames if oneshot else max(1, BLOCK_SAMPLES // channels)
    try:
        if sound.seekable():
            sound.seek(0)  # as sf.read does: libsndfile's MP3 decoder returns other last bits without it
        while len(block := sound.read(block_frames, dtype="float32", always_2d=True)):
            yield block
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise DecodeError(f"not a readable audio file ({_libsndfile_reason(exc)})") from None


def _libsndfile_reason(exc: BaseException) -> str:
    return getattr(exc, "error_string", None) or _first_line(exc)  # libsndfile's reason, without the repr


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or _first_line(exc)
    return reason[:1].lower() + reason[1:]  # "no such file or directory", "permission denied", ...


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def voiced_span(audio: np.ndarray) -> tuple[int, int]:
    """[start, end) sample span left after trimming audio more than TRIM_TOP_DB below the loudest frame.

    librosa.effects.trim's computation (frame RMS in dB relative to the loudest frame), bit for bit, with the
    RMS taken TRIM_CHUNK_FRAMES frames at a time: the same values without materializing 4 copies of a long
    signal.
    """
    db = _db_below_peak(_frame_rms(audio))
    voiced = np.flatnonzero(db > -TRIM_TOP_DB)
    if voiced.size == 0:
        return 0, audio.shape[-1]
    start = int(voiced[0]) * TRIM_HOP_LENGTH
    end = min(audio.shape[-1], (int(voiced[-1]) + 1) * TRIM_HOP_LENGTH)
    return (start, end) if end > start else (0, audio.shape[-1])


def _db_below_peak(rms: np.ndarray) -> np.ndarray:
    """librosa.amplitude_to_db(rms, ref=np.max, top_db=None): each frame's level in dB below the loudest."""
    floor = TRIM_RMS_FLOOR**2
    db = 10.0 * np.log10(np.maximum(floor, np.square(rms)))
    db -= 10.0 * np.log10(np.maximum(floor, np.square(rms.max())))
    return db


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    """librosa.feature.rms(y=audio) (centred frames, zero padding) as a 1-D array, computed in chunks."""
    half = TRIM_FRAME_LENGTH // 2
    n_frames = 1 + audio.shape[-1] // TRIM_HOP_LENGTH
    rms = np.empty(n_frames, np.float32)
    for first in range(0, n_frames, TRIM_CHUNK_FRAMES):
        last = min(first + TRIM_CHUNK_FRAMES, n_frames)
        # the padded signal's samples [first * hop, (last - 1) * hop + frame_length), zeros outside the audio
        lo, hi = first * TRIM_HOP_LENGTH - half, (last - 1) * TRIM_HOP_LENGTH + half
        chunk = audio[max(lo, 0) : min(hi, audio.shape[-1])]
        chunk = np.pad(chunk, (max(-lo, 0), max(hi - audio.shape[-1], 0)))
        # (frame_length, n) with the samples of a frame adjacent, as librosa.util.frame lays them out: the mean
        # then sums in librosa's order
        frames = np.lib.stride_tricks.sliding_window_view(chunk, TRIM_FRAME_LENGTH)[::TRIM_HOP_LENGTH].T
        rms[first:last] = np.sqrt(np.mean(np.square(frames), axis=0))
    return rms


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation (Ko et al., 2015): the audio played `factor` times as fast, tempo and pitch together,
    by resampling it as if it had been recorded at SAMPLE_RATE * factor. Factor 1 returns it unchanged."""
    if factor == 1.0:
        return audio
    return soxr.resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE, quality=RESAMPLE_TYPE).astype(np.float32)


def shift_pitch(audio: np.ndarray, semitones: float) -> np.ndarray:
    """Pitch shift at the same tempo, librosa.effects.pitch_shift's method: a phase-vocoder time stretch by
    2 ** (semitones / 12), then `change_speed` by that factor back to the original length. The whole spectrum
    moves (formants too), as if a smaller or larger voice spoke at the same pace. 0 returns it unchanged."""
    if semitones == 0:
        return audio
    import librosa  # training only: the inference feature stage does not pay for librosa's import

    factor = 2.0 ** (semitones / 12)
    return pad_or_trim(change_speed(librosa.effects.time_stretch(audio, rate=1 / factor), factor), len(audio))


@dataclass(frozen=True)
class Perturbation:
    """Training's augmentation hook on the decoded audio, before trimming: played `speed` times as fast, then
    moved `semitones` in pitch at the same tempo. The default leaves the audio as it is (every inference path)."""

    speed: float = 1.0
    semitones: float = 0.0

    def apply(self, audio: np.ndarray) -> np.ndarray:
        return shift_pitch(change_speed(audio, self.speed), self.semitones)

    def cache_suffix(self) -> str:
        """'' for the original audio, else e.g. '-speed0.9' or '-pitch+3': tells feature caches apart."""
        return (f"-speed{self.speed:g}" if self.speed != 1 else "") + (
            f"-pitch{self.semitones:+g}" if self.semitones else "")


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


def voiced_window_starts(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """Start sample of each window over the voiced span (see `window_starts`), and the span's end."""
    begin, end = voiced_span(audio)
    return begin + window_starts(end - begin), end


def cut_windows(audio: np.ndarray, starts: np.ndarray, end: int) -> np.ndarray:
    """(len(starts), N_SAMPLES) windows beginning at `starts`, zero-padded past `end`."""
    return np.stack([pad_or_trim(audio[s : min(s + N_SAMPLES, end)]) for s in starts])


def windows(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trim silence, then cut into (n_windows, N_SAMPLES) windows; also return their start times in seconds."""
    starts, end = voiced_window_starts(audio)
    return cut_windows(audio, starts, end), starts / SAMPLE_RATE
