"""Model bundles: a folder with model.keras, train_mean.npy, train_std.npy and model.json (the model card).

Loading checks the model file against the hash recorded in model.json, checks that the bundle was made
for this code's feature stage, and deserializes with Keras `safe_mode=True` (no Lambda layers, no pickles).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser import __version__, features

MODEL_FILE = "model.keras"
MEAN_FILE = "train_mean.npy"
STD_FILE = "train_std.npy"
CARD_FILE = "model.json"
FORMAT_VERSION = 1
LICENCE = (
    "Weights trained on RAVDESS (CC BY-NC-SA 4.0): non-commercial use, share alike, attribute Livingstone & Russo 2018."
)

# The default model of every command: $SER_MODEL, else the bundle shipped in the repository's models/.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = Path(os.environ.get("SER_MODEL") or MODELS_DIR / "ravdess-actors")


class BundleError(ValueError):
    """A model bundle that is missing, incomplete, tampered with or made for other features."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A loaded model with its normalization statistics and model card."""

    model: object  # keras.Model; kept untyped so importing this module does not import TensorFlow
    mean: np.ndarray
    std: np.ndarray
    card: dict
    path: Path | None = None
    classes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = tuple(self.card["classes"])

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def sha256(self) -> str:
        return self.card["files"][MODEL_FILE]

    @property
    def temperature(self) -> float:
        return card_temperature(self.card)


def save(path: str | Path, model, mean: np.ndarray, std: np.ndarray, card: dict) -> Path:
    """Write a bundle folder; the card gets file hashes, feature config, version and a timestamp added."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / MODEL_FILE)
    np.save(path / MEAN_FILE, np.asarray(mean, dtype=np.float32))
    np.save(path / STD_FILE, np.asarray(std, dtype=np.float32))
    card = {
        "format_version": FORMAT_VERSION,
        "ser_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "feature_config": features.feature_config(),
        "feature_config_hash": features.feature_config_hash(),
        "licence": LICENCE,
        **card,
        "files": {name: sha256_file(path / name) for name in (MODEL_FILE, MEAN_FILE, STD_FILE)},
    }
    write_card(path, card)
    return path


def write_card(path: str | Path, card: dict) -> None:
    """Atomically (re)write model.json."""
    target = Path(path) / CARD_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, target)


def card_temperature(card: dict) -> float:
    """The temperature dividing the model's logits (1 for a bundle without calibration)."""
    return float(card.get("calibration", {}).get("temperature", 1.0))


def ensemble_members(card: dict) -> list[dict]:
    """The member summaries of an ensemble bundle's card; empty for a single model."""
    return card.get("ensemble", {}).get("members") or []


def read_card(path: str | Path) -> dict:
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {CARD_FILE})")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path}: invalid JSON ({exc})") from None


def load(path: str | Path = DEFAULT_MODEL) -> Bundle:
    """Load and verify a bundle folder; raises BundleError with a one-line reason."""
    import keras

    import ser.model  # noqa: F401  (registers the Attention layer with Keras)

    path = Path(path)
    card = read_card(path)
    for name in (MODEL_FILE, MEAN_FILE, STD_FILE):
        if not (path / name).is_file():
            raise BundleError(f"{path}: missing {name}")
        expected = card.get("files", {}).get(name)
        if expected != sha256_file(path / name):
            raise BundleError(
                f"{path / name}: sha256 does not match {CARD_FILE} (tampered or corrupt); refusing to load"
            )
    if card.get("feature_config_hash") != features.feature_config_hash():
        raise BundleError(
            f"{path}: made for feature config {card.get('feature_config_hash')}, "
            f"this code computes {features.feature_config_hash()}; retrain or use a matching ser version"
        )
    try:
        model = keras.saving.load_model(path / MODEL_FILE, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises bare ValueError/TypeError for unsafe or unknown content
        raise BundleError(f"{path / MODEL_FILE}: refused by safe loading ({str(exc).splitlines()[0][:200]})") from None
    mean = np.load(path / MEAN_FILE, allow_pickle=False)
    std = np.load(path / STD_FILE, allow_pickle=False)
    return Bundle(model=model, mean=mean, std=std, card=card, path=path)
