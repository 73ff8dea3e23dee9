"""Streaming decode: bit-identical to the one-shot path at every block boundary, and its limits."""

from __future__ import annotations

import io
import os
import threading

import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import make_speechlike, write_audio

from ser import audio, features
from unit.reference_decode import oneshot_decode, oneshot_features, oneshot_span

SR = audio.SAMPLE_RATE

# (file name, seconds, rate, channels, subtype, format): every container, odd rates and layouts
CASES = [
    ("mono.wav", 4.0, SR, 1, "PCM_16", None),
    ("float.wav", 4.6, SR, 1, "FLOAT", None),
    ("hi-res.wav", 4.5, 96000, 8, "PCM_24", None),
    ("double.wav", 4.7, 8000, 2, "DOUBLE", None),
    ("speech.flac", 5.1, 44100, 2, None, None),
    ("speech.ogg", 4.4, 48000, 3, None, None),
    ("speech.mp3", 4.9, 16000, 1, None, "MP3"),
]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Every file streams, in blocks, RMS chunks and feature batches far smaller than the defaults."""
    monkeypatch.setattr(audio, "ONESHOT_MAX_SAMPLES", 0)
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 4099)
    monkeypatch.setattr(audio, "TRIM_CHUNK_FRAMES", 7)
    monkeypatch.setattr(features, "FEATURE_BATCH_WINDOWS", 1)


def _write(tmp_path, name, seconds, rate, channels, subtype, fmt):
    data = make_speechlike(seconds, rate, channels, seed=len(name))
    data[: rate // 3] = 0.0  # leading silence: trimming must pick the same start
    path = tmp_path / name
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    return path


def _assert_same_as_oneshot(path, exact: bool = True):
    mono, rate, channels, frames = oneshot_decode(str(path))
    expected_feats, expected_starts = oneshot_features(str(path))
    assert len(expected_starts) > 1  # several windows, so that tiny_chunks makes several feature batches
    for data in (str(path), path.read_bytes()):
        got, info = audio.decode(data)
        assert (info.sample_rate, info.channels, info.duration_s) == (rate, channels, frames / rate)
        feats, starts, _ = features.file_features(data)
        np.testing.assert_array_equal(starts, expected_starts)
        if exact:
            np.testing.assert_array_equal(got, mono)
            assert audio.voiced_span(got) == oneshot_span(mono)
            np.testing.assert_array_equal(feats, expected_feats)
        else:  # the same signal, but for up to one MP3 frame after a block boundary (see the test below)
            assert len(got) == len(mono) and np.corrcoef(got, mono)[0, 1] > 0.99
            assert feats.shape == expected_feats.shape and np.isfinite(feats).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_short_files_decode_exactly_as_before(tmp_path, case):
    _assert_same_as_oneshot(_write(tmp_path, *case))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_oneshot_at_every_boundary(tmp_path, tiny_chunks, case):
    """Bit for bit, except MP3: libsndfile 1.2.2's MP3 decoder depends on the read size (last-bit rounding, and
    up to one frame zeroed after a read that ends in digital silence), which is why files up to
    ONESHOT_MAX_SAMPLES keep the one-shot read."""
    _assert_same_as_oneshot(_write(tmp_path, *case), exact=case[5] != "MP3")


def test_streaming_equals_oneshot_with_the_real_chunk_sizes(tmp_path):
    """100 s of 8 channels with the shipped constants: 17 decode blocks, 2 RMS chunks, 3 feature batches."""
    path = _write(tmp_path, "long.wav", 100.0, SR, 8, "PCM_16", None)
    assert audio.ONESHOT_MAX_SAMPLES < 100 * SR * 8
    assert audio.TRIM_CHUNK_FRAMES < 1 + 100 * SR // audio.TRIM_HOP_LENGTH
    feats, starts, info = features.file_features(str(path))
    expected_feats, expected_starts = oneshot_features(str(path))
    assert len(starts) > features.FEATURE_BATCH_WINDOWS
    np.testing.assert_array_equal(feats, expected_feats)
    np.testing.assert_array_equal(starts, expected_starts)
    assert (info.sample_rate, info.channels, info.duration_s) == (SR, 8, 100.0)


@pytest.mark.parametrize("n", [1, 100, 511, 512, 2047, 2048, 2049, 7 * 512, 7 * 512 + 1, 50_000])
def test_voiced_span_equals_librosa_trim(tiny_chunks, n):
    rng = np.random.default_rng(n)
    signal = (rng.standard_normal(n) * np.linspace(0.0, 1.0, n) ** 4).astype(np.float32)  # a fade-in to trim
    signal[-n // 5 :] *= 1e-4  # and a quiet tail
    assert audio.voiced_span(signal) == oneshot_span(signal)


def test_header_claiming_more_data_than_present_decodes_what_is_there(tmp_path):
    whole = write_audio(tmp_path / "whole.wav", 2.0).read_bytes()
    samples, info = audio.decode(whole[: 44 + 22050 * 2])  # the header says 2 s, the data holds 1 s
    assert info.duration_s == 1.0 and len(samples) == SR


@pytest.mark.parametrize(
    ("rate", "fragment"), [(500, "unsupported sample rate 500 Hz"), (800_000, "unsupported sample rate 800000 Hz")]
)
def test_sample_rates_outside_the_range_are_refused(tmp_path, rate, fragment):
    path = tmp_path / "odd.wav"
    sf.write(path, make_speechlike(1.0, rate), rate)
    with pytest.raises(audio.DecodeError, match=fragment):
        audio.decode(str(path))


def test_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    path = write_audio(tmp_path / "long.wav", 5.0)
    monkeypatch.setattr(audio, "MAX_SECONDS", 4)
    with pytest.raises(audio.DecodeError, match="longer than"):
        audio.decode(str(path))


def test_out_of_range_samples_are_refused_but_integer_scaled_floats_are_fine(tmp_path):
    speech = make_speechlike(4.0)
    path = tmp_path / "scaled.wav"
    sf.write(path, speech * 2**31, SR, subtype="FLOAT")  # float samples at int32 scale: real files do this
    feats, _, _ = features.file_features(str(path))
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(feats, features.file_features(write_audio(tmp_path / "unit.wav", 4.0,
                                                                         subtype="FLOAT").as_posix())[0], atol=1e-3)
    sf.write(path, speech * 1e20, SR, subtype="FLOAT")  # unguarded, its STFT power overflows: NaN features
    with pytest.raises(audio.DecodeError, match="out of range"):
        audio.decode(str(path))


def test_special_files_fail_fast_with_their_reason(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    os.symlink("loop.wav", tmp_path / "loop.wav")
    os.symlink("nowhere.wav", tmp_path / "dangling.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    expected = {
        "pipe.wav": "not a regular file",  # opening a FIFO for reading would block until a writer comes
        "loop.wav": "cannot read: too many levels of symbolic links",
        "dangling.wav": "cannot read: no such file or directory",
        "empty.wav": "empty file (0 bytes)",
        ".": "is a directory",
    }
    for name, reason in expected.items():
        outcome: list[object] = []
        worker = threading.Thread(target=_decode_into, args=(str(tmp_path / name), outcome), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"{name}: decode hangs"
        assert outcome == [reason], name


def _decode_into(path: str, outcome: list) -> None:
    try:
        outcome.append(audio.decode(path))
    except audio.DecodeError as exc:
        outcome.append(str(exc))


def test_resampling_a_stream_matches_librosa_for_odd_rates(tiny_chunks):
    rng = np.random.default_rng(0)
    for rate in (1000, 7919, 11025, 192000):
        signal = rng.standard_normal((int(1.7 * rate), 1)).astype(np.float32) * 0.1
        data = _wav_bytes(signal, rate)
        expected = librosa.resample(signal[:, 0], orig_sr=rate, target_sr=SR, res_type=audio.RESAMPLE_TYPE)
        np.testing.assert_array_equal(audio.decode(data)[0], expected)


def _wav_bytes(signal: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, signal, rate, subtype="FLOAT", format="WAV")
    return buffer.getvalue()
