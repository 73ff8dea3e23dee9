"""The shipped bundles load safely and their recorded test metrics reproduce on RAVDESS."""

from __future__ import annotations

import pytest

from ser import bundle
from ser import config as config_io
from ser.evaluate import evaluate
from ser.predict import Predictor
from ser.training import TrainConfig

SHIPPED = [("ravdess-actors", "actors"), ("ravdess-actors-fast", "actors"), ("ravdess-seed", "seed")]


@pytest.mark.parametrize(("name", "protocol"), SHIPPED)
def test_card_describes_the_bundle(name: str, protocol: str) -> None:
    card = bundle.read_card(bundle.MODELS_DIR / name)
    assert card["protocol"] == protocol
    assert card["classes"] == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    assert "CC BY-NC-SA 4.0" in card["licence"]
    assert card["calibration"]["fit_on"] == "validation"
    assert set(card["test"]) == {protocol}, "test metrics are recorded for the bundle's own protocol only"
    # `ser ensemble` rebuilds the recorded recipe to grow a bundle: a key the code no longer knows would refuse it.
    assert config_io.build(TrainConfig, card["train_config"]).protocol == protocol


@pytest.mark.data
@pytest.mark.parametrize(("name", "protocol"), SHIPPED)
def test_recorded_test_metrics_reproduce(ravdess_dir, name: str, protocol: str) -> None:
    predictor = Predictor(bundle.MODELS_DIR / name)
    result = evaluate(predictor, ravdess_dir, protocol)
    recorded = predictor.bundle.card["test"][protocol]
    assert result["n"] == recorded["n"]
    for key in ("accuracy", "macro_f1", "weighted_f1", "ece"):
        assert result[key] == pytest.approx(recorded[key], abs=1e-6), key
    assert result["confusion_matrix"] == recorded["confusion_matrix"]
