"""ser.audio: decoding every container/rate/layout to mono 22.05 kHz, clear errors, padding and windows."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import make_speechlike, write_audio

from ser import audio

SR = audio.SAMPLE_RATE


@pytest.mark.parametrize(
    ("suffix", "fmt", "lossless"),
    [("wav", None, True), ("flac", None, True), ("ogg", None, False), ("mp3", "MP3", False)],
)
def test_decode_containers(tmp_path, suffix, fmt, lossless):
    path = write_audio(tmp_path / f"clip.{suffix}", seconds=2.0, format=fmt)
    samples, info = audio.decode(str(path))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert (info.sample_rate, info.channels) == (SR, 1)
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    original = make_speechlike(2.0)[:, 0]
    if lossless:
        np.testing.assert_allclose(samples, original, atol=2 / 2**15)
    else:  # lossy codecs: same length and still clearly the same signal
        assert len(samples) == pytest.approx(len(original), abs=0.05 * SR)
        n = min(len(samples), len(original))
        assert np.corrcoef(samples[:n], original[:n])[0, 1] > 0.9
    from_bytes, info_bytes = audio.decode(path.read_bytes())
    np.testing.assert_array_equal(from_bytes, samples)
    assert info_bytes == info


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000, 96000])
def test_decode_resamples_to_22050_keeping_duration_and_pitch(tmp_path, rate):
    t = np.arange(int(1.5 * rate)) / rate
    path = tmp_path / "tone.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440.0 * t), rate)
    samples, info = audio.decode(str(path))
    assert (info.sample_rate, info.duration_s) == (rate, 1.5)
    assert abs(len(samples) - 1.5 * SR) <= 1
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.fft.rfftfreq(len(samples), 1 / SR)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)


@pytest.mark.parametrize("channels", [2, 8])
def test_decode_mixes_channels_to_their_mean(tmp_path, channels):
    data = np.concatenate([make_speechlike(1.0, seed=c) * (c + 1) / channels for c in range(channels)], axis=1)
    path = tmp_path / "multi.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    samples, info = audio.decode(str(path))
    assert info.channels == channels
    np.testing.assert_array_equal(samples, data.mean(axis=1, dtype=np.float32))


@pytest.mark.parametrize(("subtype", "atol"), [("PCM_16", 2**-15), ("PCM_24", 2**-23), ("FLOAT", 0), ("DOUBLE", 1e-7)])
def test_decode_subtypes(tmp_path, subtype, atol):
    path = write_audio(tmp_path / "clip.wav", seconds=1.0, subtype=subtype)
    assert sf.info(path).subtype == subtype
    samples, _ = audio.decode(str(path))
    assert samples.dtype == np.float32
    np.testing.assert_allclose(samples, make_speechlike(1.0)[:, 0], rtol=0, atol=atol)


def _write_samples(path, data, subtype="PCM_16"):
    sf.write(path, data, SR, subtype=subtype)
    return str(path)


ERROR_CASES = {
    "empty bytes": (lambda tmp: b"", "empty file"),
    "random bytes": (lambda tmp: np.random.default_rng(0).bytes(4096), "not a readable audio file"),
    "text file": (lambda tmp: _text_file(tmp), "not a readable audio file"),
    "text bytes": (lambda tmp: b"just some words\n" * 20, "not a readable audio file"),
    "missing path": (lambda tmp: str(tmp / "nope.wav"), "no such file"),
    "directory": (lambda tmp: str(tmp), "is a directory"),
    "zero samples": (lambda tmp: _write_samples(tmp / "z.wav", np.zeros((0, 1), np.float32)), "zero samples"),
    "nan": (lambda tmp: _write_samples(tmp / "n.wav", np.full((500, 1), np.nan, np.float32), "FLOAT"), "NaN"),
    "silent": (lambda tmp: _write_samples(tmp / "s.wav", np.zeros((SR, 1), np.float32)), "silent"),
}


def _text_file(tmp):
    path = tmp / "notes.wav"
    path.write_text("this is not audio\n")
    return str(path)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_decode_errors_are_one_clear_line(tmp_path, case):
    make, fragment = ERROR_CASES[case]
    with pytest.raises(audio.DecodeError) as caught:
        audio.decode(make(tmp_path))
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and " at 0x" not in message  # no object reprs or tracebacks for the user


def test_pad_or_trim():
    ramp = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(audio.pad_or_trim(ramp, 4), ramp[:4])
    np.testing.assert_array_equal(audio.pad_or_trim(ramp, 10), ramp)
    np.testing.assert_array_equal(audio.pad_or_trim(ramp, 13), np.r_[ramp, 0, 0, 0])
    batch = audio.pad_or_trim(np.stack([ramp, -ramp]), 12)
    assert batch.shape == (2, 12) and not batch[:, 10:].any()
    assert audio.pad_or_trim(ramp).shape == (audio.N_SAMPLES,)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [0]),
        (audio.N_SAMPLES, [0]),
        (audio.N_SAMPLES + 1, [0, 1]),
        (audio.N_SAMPLES + 2 * audio.WINDOW_HOP, [0, audio.WINDOW_HOP, 2 * audio.WINDOW_HOP]),
        (10 * SR, [0, 33075, 66150, 99225, 132300, 154350]),
    ],
)
def test_window_starts(n, expected):
    assert audio.window_starts(n).tolist() == expected


def _with_silence(lead_s: float, voiced_s: float, tail_s: float) -> np.ndarray:
    voiced = make_speechlike(voiced_s)[:, 0]
    return np.concatenate([np.zeros(int(lead_s * SR), np.float32), voiced, np.zeros(int(tail_s * SR), np.float32)])


def test_windows_short_audio_is_one_padded_window_from_the_voiced_start():
    samples = _with_silence(0.5, 1.0, 0.5)
    begin, end = audio.voiced_span(samples)
    assert begin / SR == pytest.approx(0.5, abs=0.1) and end / SR == pytest.approx(1.5, abs=0.1)
    frames, starts = audio.windows(samples)
    assert frames.shape == (1, audio.N_SAMPLES) and frames.dtype == np.float32
    assert starts.tolist() == [begin / SR]
    np.testing.assert_array_equal(frames[0, : end - begin], samples[begin:end])
    assert not frames[0, end - begin :].any()


def test_windows_long_audio_hops_and_ends_aligned():
    samples = _with_silence(1.0, 10.0, 0.5)
    begin, end = audio.voiced_span(samples)
    assert begin / SR == pytest.approx(1.0, abs=0.1)
    frames, starts = audio.windows(samples)
    assert frames.shape == (len(starts), audio.N_SAMPLES) and len(starts) == 6
    np.testing.assert_allclose(np.diff(starts[:-1]), audio.WINDOW_HOP_SECONDS)
    assert starts[0] == begin / SR  # seconds in the original audio, leading silence included
    first = np.round(starts * SR).astype(int)
    assert first[-1] + audio.N_SAMPLES == end  # the last window ends where the voice ends
    for frame, start in zip(frames, first, strict=True):
        np.testing.assert_array_equal(frame, samples[start : start + audio.N_SAMPLES])
