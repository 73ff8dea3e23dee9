"""ser.config on the real job config (TrainConfig): unknown keys and wrong types name the key, overrides, dumps."""

from __future__ import annotations

import pytest
import yaml

from ser import config as config_io
from ser.training import TrainConfig


def _load(tmp_path, text: str | None = None, overrides=(), **values) -> TrainConfig:
    path = None
    if text is not None:
        path = tmp_path / "job.yaml"
        path.write_text(text)
    return config_io.load(TrainConfig, path, overrides, **values)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("bogus: 1\n", (), "unknown config key bogus "),
        (None, ["bogus=1"], "unknown config key bogus "),
        ("augment:\n  bogus: 1\n", (), "unknown config key augment.bogus "),
        (None, ["model.bogus=[1]"], "unknown config key model.bogus "),
        ("epochs: many\n", (), "epochs: expected int, got str 'many'"),
        (None, ["epochs=true"], "epochs: expected int, got True"),
        (None, ["epochs=2.5"], "epochs: expected int, got float 2.5"),
        (None, ["learning_rate=fast"], "learning_rate: expected float"),
        (None, ["model.lstm_units=big"], "model.lstm_units: expected int"),
        (None, ["model.conv_filters=8"], "model.conv_filters: expected a list"),
        (None, ["model.conv_filters=[8, x]"], r"model.conv_filters\[1\]: expected int"),
        (None, ["augment=3"], "augment: expected a mapping"),
        (None, ["max_files=some"], "max_files: expected int"),
        (None, ["epochs"], "expected KEY=VALUE"),
        ("- a\n- b\n", (), "expected a mapping at the top level"),
        ("epochs: [1\n", (), "invalid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(config_io.ConfigError, match=message):
        _load(tmp_path, text, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(config_io.ConfigError, match="no such config file"):
        config_io.load(TrainConfig, tmp_path / "absent.yaml")


def test_ints_become_floats_and_lists_tuples(tmp_path):
    cfg = _load(tmp_path, "learning_rate: 1\naugment:\n  noise_std: 0\nmodel:\n  conv_filters: [8, 16]\n")
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.augment.noise_std == 0.0 and type(cfg.augment.noise_std) is float
    assert cfg.model.conv_filters == (8, 16)


def test_file_then_overrides_then_keywords(tmp_path):
    text = "epochs: 3\nseed: 7\naugment:\n  noise_std: 0.5\n"
    cfg = _load(tmp_path, text, ["augment.noise_std=0.25", "model.lstm_units=64", "seed=8", "max_files=null"], seed=9)
    assert (cfg.epochs, cfg.seed, cfg.max_files) == (3, 9, None)
    assert cfg.augment.noise_std == 0.25 and cfg.augment.probability == TrainConfig().augment.probability
    assert cfg.model.lstm_units == 64 and cfg.model.conv_filters == TrainConfig().model.conv_filters


@pytest.mark.parametrize("overrides, message", [
    (["protocol=random"], "protocol: unknown 'random'"),
    (["validation_actors=[20, 21]"], "overlaps the test actors"),
    (["protocol=seed", "validation_actors=[1, 2]"], "only the actors protocol"),
])
def test_values_are_still_validated_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, overrides=overrides)


def test_validation_actors_override_is_a_tuple_of_actors(tmp_path):
    assert _load(tmp_path, overrides=["validation_actors=[1, 2, 3, 4]"]).validation_actors == (1, 2, 3, 4)


@pytest.mark.parametrize("overrides", [(), ("epochs=2", "augment.noise_std=0.3", "model.conv_filters=[4, 8]")])
def test_dump_round_trips(tmp_path, overrides):
    cfg = _load(tmp_path, overrides=overrides)
    dumped = config_io.dump(cfg)
    assert _load(tmp_path, dumped) == cfg
    assert yaml.safe_load(dumped) == config_io.to_dict(cfg)


def test_shipped_train_yaml_documents_every_default():
    path = config_io.CONFIG_DIR / "train.yaml"
    assert config_io.load(TrainConfig, path) == TrainConfig()
    assert yaml.safe_load(path.read_text()) == config_io.to_dict(TrainConfig())
