"""ser.features: the 128x128 log-mel contract, its hash, and one feature stage shared by every path."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
from conftest import write_audio
from threadpoolctl import threadpool_limits

from ser import audio, features, pipeline, store, training
from ser.predict import Predictor
from unit.reference_decode import librosa_log_mel_batch

# Bundles record this hash; it may only change together with a deliberate change of the feature contract.
FEATURE_CONFIG_HASH = "c29e8388396be9b4"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """5 s of 44.1 kHz stereo FLAC: resampling, channel mixing and several windows are all on the path."""
    return write_audio(tmp_path_factory.mktemp("clip") / "clip.flac", 5.0, sample_rate=44100, channels=2, seed=3)


@pytest.fixture(scope="module")
def clip_features(clip):
    return features.file_features(str(clip))


def test_features_shape_dtype_and_range(clip_features):
    feats, starts, info = clip_features
    assert feats.shape == (len(starts), 128, 128) and len(starts) >= 2
    assert feats.dtype == np.float32
    assert feats.min() >= -80.0
    np.testing.assert_array_equal(feats.max(axis=(1, 2)), 0.0)  # dB relative to each window's peak
    assert (info.sample_rate, info.channels) == (44100, 2)


def test_mel_filters_equal_librosas():
    expected = librosa.filters.mel(sr=audio.SAMPLE_RATE, n_fft=features.N_FFT, n_mels=features.N_MELS)
    np.testing.assert_array_equal(features.mel_filters(), expected)


@pytest.mark.parametrize("level", [1e-4, 0.05, 1.0, 3e4])
def test_log_mels_equal_librosas_bit_for_bit(clip, level):
    """Noise at levels from near-silence to integer scale, a tone, and real decoded windows; batches of 1 and more."""
    rng = np.random.default_rng(int(level * 1e4))
    noise = (rng.standard_normal((3, audio.N_SAMPLES)) * level).astype(np.float32)
    tone = (level * np.sin(np.arange(audio.N_SAMPLES) * 2 * np.pi * 440 / audio.SAMPLE_RATE)).astype(np.float32)
    decoded, _ = audio.windows(audio.decode(str(clip))[0])
    for windows in (noise, noise[:1], tone[None], decoded):
        np.testing.assert_array_equal(features.log_mel_batch(windows), librosa_log_mel_batch(windows))


def test_the_feature_stage_imports_neither_librosa_nor_scipy(clip):
    """Importing librosa's core (scipy.signal, numba) cost every worker ~1.8 s of CPU before its first clip."""
    script = ("import sys; from ser import features; features.file_features(sys.argv[1]); "
              "print(sorted(m for m in ('librosa', 'scipy', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, str(clip)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_batch_equals_one_by_one(clip):
    frames, _ = audio.windows(audio.decode(str(clip))[0])
    one_by_one = np.stack([features.log_mel(frame) for frame in frames])
    np.testing.assert_array_equal(features.log_mel_batch(frames), one_by_one)
    np.testing.assert_array_equal(features.log_mel_batch(frames[::-1]), one_by_one[::-1])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_features_are_deterministic_whatever_the_blas_threads(clip, clip_features, threads):
    with threadpool_limits(threads, user_api="blas"):  # a Ray worker has 1, a driver all cores
        np.testing.assert_array_equal(features.file_features(str(clip))[0], clip_features[0])


@pytest.mark.parametrize("shape", [(audio.N_SAMPLES,), (1, audio.N_SAMPLES + 1), (2, 3, audio.N_SAMPLES)])
def test_log_mel_batch_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match="expected windows of shape"):
        features.log_mel_batch(np.zeros(shape, np.float32))


def test_feature_config_hash_is_stable():
    assert features.feature_config_hash() == features.feature_config_hash(features.feature_config())
    assert features.feature_config_hash() == FEATURE_CONFIG_HASH


@pytest.mark.parametrize("key", sorted(features.feature_config()))
def test_feature_config_hash_changes_with_any_setting(key):
    changed = {**features.feature_config(), key: "changed"}
    assert features.feature_config_hash(changed) != FEATURE_CONFIG_HASH


def test_feature_config_hash_follows_the_code_constants(monkeypatch):
    monkeypatch.setattr(features, "N_FFT", 1024)
    assert features.feature_config()["n_fft"] == 1024
    assert features.feature_config_hash() != FEATURE_CONFIG_HASH


# ---------------------------------------------------------------- one feature stage for every path


@pytest.fixture
def spied_predictor(tiny_bundle, monkeypatch):
    """A Predictor whose `logits` records the features it is given."""
    seen: list[np.ndarray] = []
    original = Predictor.logits

    def logits(self, feats):
        seen.append(np.array(feats))
        return original(self, feats)

    monkeypatch.setattr(Predictor, "logits", logits)
    return Predictor(tiny_bundle), seen


def _predicted(run):
    def path_features(clip, spied):
        predictor, seen = spied
        run(predictor, clip)
        (feats,) = seen
        return feats

    return path_features


PATHS = {
    "file_features(bytes)": lambda clip, spied: features.file_features(clip.read_bytes())[0],
    "training._featurize": lambda clip, spied: training._featurize({"row": [0], "path": [str(clip)]})["features"],
    "pipeline.featurize_one": lambda clip, spied: pipeline.featurize_one(str(clip), store.S3Options())["features"],
    "Predictor.predict_file(path)": _predicted(lambda p, clip: p.predict_file(str(clip))),
    "Predictor.predict_file(bytes)": _predicted(lambda p, clip: p.predict_file(clip.read_bytes(), clip.name)),
    "Predictor.predict_files": _predicted(lambda p, clip: list(p.predict_files([str(clip)]))),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_path_feeds_identical_features(clip, clip_features, spied_predictor, path):
    got = PATHS[path](clip, spied_predictor)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, clip_features[0])


def test_training_ray_data_stage_matches(clip, clip_features, tmp_path, local_ray):
    other = write_audio(tmp_path / "other.wav", 2.0, seed=9)
    table = pd.DataFrame({"path": [str(clip), str(other)]})
    table["sha256"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in table["path"]]
    computed = training.extract_features(table, tmp_path / "cache")
    cached = training.extract_features(table, tmp_path / "cache")
    for result in (computed, cached):
        assert result.features.dtype == np.float32
        np.testing.assert_array_equal(result.features[result.file_index == 0], clip_features[0])
        np.testing.assert_array_equal(result.features[result.file_index == 1], features.file_features(str(other))[0])
