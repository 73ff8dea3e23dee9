"""ser.model and ser.bundle: the architecture, and bundles that load only when intact, safe and matching."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest

from ser import bundle, features, ravdess
from ser.model import ModelConfig, average_logits, build_model

TINY = ModelConfig(conv_filters=(4, 8, 8), lstm_units=8)


def _card(config: ModelConfig = TINY) -> dict:
    return {"name": "test", "classes": list(ravdess.EMOTIONS), "model_config": config.to_dict()}


def test_default_model_shape_and_size():
    model = build_model()
    assert model.input_shape == (None, *features.FEATURE_SHAPE, 1)
    assert model.output_shape == (None, 8)
    assert model.count_params() == 2_390_920  # CNN -> BiLSTM(128) -> Attention: the original notebook's ~2.4 M
    assert model.layers[-1].get_config()["activation"] == "linear"  # logits; softmax happens in ser.predict


def test_model_config_round_trips_through_a_dict():
    config = ModelConfig(conv_filters=(8, 16), lstm_units=4)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = build_model(TINY)
    mean, std = np.full((128, 1), -40.0, np.float32), np.full((128, 1), 12.0, np.float32)
    bundle.save(tmp_path, model, mean, std, _card())
    loaded = bundle.load(tmp_path)
    x = np.random.default_rng(0).standard_normal((3, *features.FEATURE_SHAPE, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.model(x, training=False), model(x, training=False))
    assert loaded.model.get_layer("attention").__class__.__name__ == "Attention"
    np.testing.assert_array_equal(loaded.mean, mean)
    np.testing.assert_array_equal(loaded.std, std)
    assert loaded.classes == ravdess.EMOTIONS
    assert loaded.card["feature_config_hash"] == features.feature_config_hash()
    assert loaded.sha256 == bundle.sha256_file(tmp_path / bundle.MODEL_FILE)
    assert loaded.temperature == 1.0  # no calibration recorded


@pytest.fixture
def copied(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy")


def _append_byte(path):
    with path.open("ab") as handle:
        handle.write(b"\0")


def _rewrite_card(path, **changes):
    bundle.write_card(path, {**bundle.read_card(path), **changes})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _append_byte(p / bundle.MODEL_FILE), "sha256 does not match"),
        (lambda p: np.save(p / bundle.MEAN_FILE, np.float32(0.0)), "sha256 does not match"),
        (lambda p: _rewrite_card(p, feature_config_hash="0123abcd"), "made for feature config 0123abcd"),
        (lambda p: (p / bundle.CARD_FILE).write_text("{not json"), "invalid JSON"),
        *[(lambda p, f=f: (p / f).unlink(), f"missing {f}") for f in (bundle.MODEL_FILE, bundle.STD_FILE)],
        (lambda p: (p / bundle.CARD_FILE).unlink(), "not a model bundle"),
    ],
    ids=["tampered model", "tampered mean", "feature config", "bad card", "no model", "no std", "no card"],
)
def test_damaged_bundles_are_refused(copied, damage, message):
    assert bundle.load(copied).name == "tiny-test"
    damage(copied)
    with pytest.raises(bundle.BundleError, match=message):
        bundle.load(copied)


def test_lambda_layer_refused_by_safe_mode(tmp_path):
    inputs = keras.Input((*features.FEATURE_SHAPE, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8)(keras.layers.GlobalAveragePooling2D()(x)))
    bundle.save(tmp_path, model, np.float32(0.0), np.float32(1.0), _card())
    with pytest.raises(bundle.BundleError, match=r"refused by safe loading.*Lambda"):
        bundle.load(tmp_path)


def test_ensemble_averages_member_logits_and_loads_safely(tmp_path):
    members = [build_model(TINY) for _ in range(3)]
    x = np.random.default_rng(1).standard_normal((2, *features.FEATURE_SHAPE, 1)).astype(np.float32)
    expected = np.mean([member(x, training=False) for member in members], axis=0)
    mean, std = np.zeros((), np.float32), np.ones((), np.float32)
    bundle.save(tmp_path, average_logits(members), mean, std, _card())
    loaded = bundle.load(tmp_path)  # safe_mode=True: nested members and Average are plain serializable layers
    np.testing.assert_allclose(loaded.model(x, training=False), expected, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in loaded.model.layers[1:4]] == ["member_0", "member_1", "member_2"]


def test_instance_norm_removes_what_is_constant_within_a_recording_and_loads_safely(tmp_path):
    """model.instance_norm: a per-band offset and scale over the whole clip (a speaker's or a channel's
    spectral envelope) does not change the logits; the layer round-trips through a safe load."""
    model = build_model(ModelConfig(conv_filters=(4, 8, 8), lstm_units=8, instance_norm=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *features.FEATURE_SHAPE, 1)).astype(np.float32)
    offset = rng.normal(scale=10.0, size=(1, features.N_MELS, 1, 1)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=(1, features.N_MELS, 1, 1)).astype(np.float32)
    logits = model(x, training=False).numpy()
    np.testing.assert_allclose(model(x * scale + offset, training=False).numpy(), logits, atol=1e-3)  # epsilon
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), logits)
    plain = build_model(ModelConfig(conv_filters=(4, 8, 8), lstm_units=8))
    assert "instance_norm" not in [layer.name for layer in plain.layers]
