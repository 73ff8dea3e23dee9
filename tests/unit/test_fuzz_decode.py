"""Fuzzing the decode + feature stage: whatever the bytes, `features.file_features` returns finite features of
the contract's shape or raises `audio.DecodeError` with a one-line reason; nothing else, no hang, and the same
outcome from bytes (S3 inputs) as from a path (local inputs).

Four input families: random bytes; random bytes behind a RIFF/WAVE or FLAC header with random fields (rates,
channel counts, sizes that lie); real WAV/FLAC/Ogg/MP3 files with random mutations; and valid but odd audio
(any rate 1-192 kHz, 1-8 channels, 16/24-bit PCM or float/double, 0-3 s, silent, denormal, huge, NaN or
infinite samples), which must be labeled exactly when it is usable audio and must match the one-shot path
even when forced to stream. The default suite runs FAST examples of each (derandomized, so CI is stable);
`-m slow` runs SLOW examples with fresh randomness. Each test prints how many inputs it tried.
"""

from __future__ import annotations

import io
import struct
import sys
import tempfile
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
from conftest import make_speechlike
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ser import audio, features
from unit.reference_decode import oneshot_features

FAST = {"bytes": 500, "headers": 500, "mutations": 300, "audio": 60, "ray": 4}
SLOW = {"bytes": 10_000, "headers": 10_000, "mutations": 5000, "audio": 1500, "ray": 50}
DEADLINE = timedelta(seconds=30)  # per input, on a loaded 2-core machine; a decode takes well under 1 s
HANG_S = 1800  # pytest-timeout for a whole fuzz test: what a deadline cannot catch (a decode that never returns)
MAX_PAYLOAD = 8192
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT", "DOUBLE")
SCALES = (0.0, 1e-45, 1e-38, 1e-6, 1e-3, 0.5, 1.0, 40.0, 2.0**31, 1e12, 1e30)  # denormal ... beyond MAX_PEAK

TRIED: dict[str, int] = {}


def _fuzz(name: str, strategy: st.SearchStrategy, check, examples: int, slow: bool) -> None:
    """Run `check` on `examples` draws of `strategy`; print how many inputs were tried."""
    TRIED[name] = 0

    @settings(max_examples=examples, deadline=DEADLINE, database=None, derandomize=not slow, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(data):
        TRIED[name] += 1
        check(data)

    run()
    print(f"\nfuzz {name}: {TRIED[name]} examples tried")
    assert TRIED[name] >= min(examples, 50)


# ---------------------------------------------------------------- the property


def outcome(data: bytes | str) -> str | tuple[np.ndarray, np.ndarray, audio.AudioInfo]:
    """The reason of the DecodeError, or the checked result; any other exception propagates (a failure)."""
    try:
        feats, starts, info = features.file_features(data)
    except audio.DecodeError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason, repr(reason)
        return reason
    assert feats.dtype == np.float32 and feats.shape == (len(starts), *features.FEATURE_SHAPE) and len(starts) >= 1
    assert np.isfinite(feats).all() and feats.min() >= -features.TOP_DB
    np.testing.assert_array_equal(feats.max(axis=(1, 2)), 0.0)
    assert audio.MIN_SOURCE_RATE <= info.sample_rate <= audio.MAX_SOURCE_RATE and info.channels >= 1
    assert 0 < info.duration_s <= audio.MAX_SECONDS and np.all(np.diff(starts) > 0)
    return feats, starts, info


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True)) and a[2] == b[2]


def check_bytes_and_path(data: bytes) -> str | tuple:
    """Same outcome from the bytes and from a file holding them."""
    from_bytes = outcome(data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.wav"
        path.write_bytes(data)
        from_path = outcome(str(path))
    assert same(from_bytes, from_path), (from_bytes if isinstance(from_bytes, str) else "ok",
                                         from_path if isinstance(from_path, str) else "ok")
    return from_bytes


# ---------------------------------------------------------------- the inputs

u16, u32 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)


@st.composite
def wav_headed(draw) -> bytes:
    """A RIFF/WAVE header whose every field is drawn (often plausible, sometimes absurd), then random data."""
    tag = draw(st.sampled_from([1, 3, 0xFFFE]) | u16)  # PCM, IEEE float, extensible, anything
    channels = draw(st.integers(0, 9) | u16)
    rate = draw(st.sampled_from([0, 1, 999, 1000, 8000, 22050, 44100, 96000, 768_000, 768_001]) | u32)
    bits = draw(st.sampled_from([0, 8, 16, 24, 32, 64]) | u16)
    align = draw(st.just(channels * bits // 8 % 2**16) | u16)
    payload = draw(st.binary(max_size=MAX_PAYLOAD))
    data_size = draw(st.just(len(payload)) | st.sampled_from([0, 2**31, 2**32 - 1]) | u32)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align % 2**32, align, bits)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + payload
    riff_size = draw(st.just(len(body)) | u32)
    return b"RIFF" + struct.pack("<I", riff_size) + body


@st.composite
def flac_headed(draw) -> bytes:
    """fLaC and a STREAMINFO block with drawn fields (rate, channels, bits, total samples), then random data."""
    rate = draw(st.sampled_from([0, 1, 8000, 44100, 655_350]) | st.integers(0, 2**20 - 1))
    packed = (rate << 44) | (draw(st.integers(0, 7)) << 41) | (draw(st.integers(0, 31)) << 36)
    packed |= draw(st.integers(0, 2**36 - 1))  # total samples, 0 = unknown
    info = struct.pack(">HH", draw(u16), draw(u16)) + draw(st.binary(min_size=6, max_size=6))
    info += packed.to_bytes(8, "big") + draw(st.binary(min_size=16, max_size=16))  # + the MD5
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info + draw(st.binary(max_size=MAX_PAYLOAD))


@lru_cache(maxsize=1)
def seed_files() -> dict[str, bytes]:
    """Small real files in every container to mutate."""
    seeds = {}
    for name, rate, channels, fmt, subtype in [("wav", 22050, 1, "WAV", "PCM_16"), ("flac", 16000, 2, "FLAC", None),
                                               ("ogg", 44100, 1, "OGG", None), ("mp3", 44100, 2, "MP3", None),
                                               ("float-wav", 48000, 2, "WAV", "FLOAT")]:
        buffer = io.BytesIO()
        sf.write(buffer, make_speechlike(1.0, rate, channels), rate, format=fmt, subtype=subtype)
        seeds[name] = buffer.getvalue()
    return seeds


@st.composite
def mutated(draw) -> bytes:
    """A real file with bytes overwritten, inserted, zeroed or cut off."""
    data = bytearray(seed_files()[draw(st.sampled_from(sorted(seed_files())))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["overwrite", "insert", "zero", "truncate"]))
        # mostly in the first kilobyte, where the headers are
        at = draw(st.integers(0, min(1024, len(data))) | st.integers(0, len(data)))
        blob = draw(st.binary(min_size=1, max_size=16))
        if op == "overwrite":
            data[at : at + len(blob)] = blob
        elif op == "insert":
            data[at:at] = blob
        elif op == "zero":
            data[at : at + len(blob)] = bytes(len(blob))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def odd_audio(draw) -> dict:
    """Valid audio with drawn rate, channels, subtype, length and content (scale, NaN/inf, silence)."""
    rate = draw(st.sampled_from([1000, 8000, 11025, 44100, 96000, 192000]) | st.integers(1000, 192000))
    channels = draw(st.integers(1, 8))
    frames = draw(st.sampled_from([0, 1, 2, 2047, audio.N_SAMPLES]) | st.integers(0, min(3 * rate, 2**20 // channels)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["speech", "noise", "constant", "impulse"]))
    if kind == "speech":
        samples = make_speechlike(frames / rate, rate, channels)[:frames]
    elif kind == "noise":
        samples = rng.standard_normal((frames, channels))
    elif kind == "constant":
        samples = np.full((frames, channels), rng.uniform(-1, 1))
    else:
        samples = np.zeros((frames, channels))
        samples[rng.integers(0, max(frames, 1), size=min(frames, 3))] = 1.0
    samples = samples * draw(st.sampled_from(SCALES))
    if frames and draw(st.booleans()) and draw(st.booleans()):  # a quarter of them: one NaN or infinity
        samples[rng.integers(frames), rng.integers(channels)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    subtype = draw(st.sampled_from(SUBTYPES))
    buffer = io.BytesIO()
    with np.errstate(invalid="ignore", over="ignore"):
        sf.write(buffer, samples.astype(np.float64), rate, format="WAV", subtype=subtype)
    return {"data": buffer.getvalue(), "rate": rate, "channels": channels, "frames": frames,
            "block": draw(st.integers(256, 65536))}  # streamed in blocks of this many samples too


def check_odd_audio(case: dict) -> None:
    """Usable audio is labeled (exactly like the one-shot path, also when forced to stream); the rest refused."""
    result = check_bytes_and_path(case["data"])
    stored, _ = sf.read(io.BytesIO(case["data"]), dtype="float32", always_2d=True)  # what the file holds
    mono = stored.mean(axis=1)
    usable = len(mono) > 0 and np.isfinite(mono).all() and audio.SILENCE_PEAK <= np.abs(mono).max() <= audio.MAX_PEAK
    assert isinstance(result, tuple) == usable, (result if isinstance(result, str) else "ok", case["frames"])
    if not usable:
        return
    assert (result[2].sample_rate, result[2].channels) == (case["rate"], case["channels"])
    expected_feats, expected_starts = oneshot_features(case["data"])
    np.testing.assert_array_equal(result[0], expected_feats)
    np.testing.assert_array_equal(result[1], expected_starts)
    with mock.patch.object(audio, "ONESHOT_MAX_SAMPLES", 0), mock.patch.object(audio, "BLOCK_SAMPLES", case["block"]):
        streamed = outcome(case["data"])
    assert same(streamed, result)


ANY_INPUT = st.binary(max_size=MAX_PAYLOAD) | wav_headed() | flac_headed() | mutated()
FAMILIES = {
    "bytes": (st.binary(max_size=MAX_PAYLOAD), check_bytes_and_path),
    "headers": (wav_headed() | flac_headed(), check_bytes_and_path),
    "mutations": (mutated(), check_bytes_and_path),
    "audio": (odd_audio(), check_odd_audio),
}


def _decode_batch(inputs: list[bytes]) -> list:
    """In a Ray worker: each input's reason or its features' shape and finiteness; other errors propagate."""
    results = []
    for data in inputs:
        try:
            feats, _, _ = features.file_features(data)
            results.append((feats.shape, bool(np.isfinite(feats).all())))
        except audio.DecodeError as exc:
            results.append(str(exc))
    return results


def _fuzz_in_ray(ray, batches: int, slow: bool) -> None:
    """Batches of any input through one Ray task each: the worker survives (max_retries=0 makes a crash
    visible), raises nothing but DecodeError and returns no NaN."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    decode = ray.remote(max_retries=0)(_decode_batch)
    TRIED["ray inputs"] = 0

    def check(batch: list[bytes]) -> None:
        TRIED["ray inputs"] += len(batch)
        for result in ray.get(decode.remote(batch), timeout=HANG_S):
            assert isinstance(result, str) or (result[0][1:] == features.FEATURE_SHAPE and result[1]), result

    _fuzz("ray batches", st.lists(ANY_INPUT, min_size=20, max_size=40), check, batches, slow)
    print(f"fuzz in a Ray worker: {TRIED['ray inputs']} inputs tried")


# ---------------------------------------------------------------- the tests (default suite, then `-m slow`)


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz(family):
    _fuzz(family, *FAMILIES[family], FAST[family], slow=False)


@pytest.mark.timeout(HANG_S)
def test_fuzz_batches_in_a_ray_worker(local_ray):
    _fuzz_in_ray(local_ray, FAST["ray"], slow=False)


@pytest.mark.slow
@pytest.mark.timeout(6 * HANG_S)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz_many(family):
    _fuzz(family, *FAMILIES[family], SLOW[family], slow=True)


@pytest.mark.slow
@pytest.mark.timeout(6 * HANG_S)
def test_fuzz_many_batches_in_a_ray_worker(local_ray):
    _fuzz_in_ray(local_ray, SLOW["ray"], slow=True)
