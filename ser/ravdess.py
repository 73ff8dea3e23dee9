"""RAVDESS: parse file names, index a directory, and the named train/validation/test protocols.

File names are `MM-VV-EE-II-SS-RR-AA.ext`: modality, vocal channel, emotion, intensity, statement,
repetition, actor. Get the corpus from Zenodo, record 1188976 (https://zenodo.org/records/1188976),
licensed CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
MODALITIES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNELS = {"01": "speech", "02": "song"}
INTENSITIES = {"01": "normal", "02": "strong"}
AUDIO_SUFFIXES = (".wav", ".flac")
ZENODO_URL = "https://zenodo.org/records/1188976"

SEED = 42
SEED_TEST_FRACTION = 0.2  # the original recipe's stratified 80/20 split
SEED_VALIDATION_FRACTION = 0.1  # of the training part, for early stopping and calibration
ACTORS_TEST = tuple(range(21, 25))
ACTORS_VALIDATION = tuple(range(17, 21))  # two male (odd) and two female (even) voices
PROTOCOLS = ("seed", "actors")

_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


class RavdessNameError(ValueError):
    """A file name that is not a RAVDESS `MM-VV-EE-II-SS-RR-AA` name."""


def parse_name(path: str | Path) -> dict:
    """Parse a RAVDESS file name into its labelled fields."""
    stem = Path(path).stem
    match = _NAME.match(stem)
    if not match:
        raise RavdessNameError(
            f"{Path(path).name}: not a RAVDESS name (expected MM-VV-EE-II-SS-RR-AA, 7 two-digit fields)"
        )
    modality, channel, emotion, intensity, statement, repetition, actor = match.groups()
    checks = {
        "modality": (modality, MODALITIES),
        "vocal channel": (channel, VOCAL_CHANNELS),
        "intensity": (intensity, INTENSITIES),
    }
    for field, (code, known) in checks.items():
        if code not in known:
            raise RavdessNameError(f"{Path(path).name}: unknown {field} code {code}")
    if not 1 <= int(emotion) <= len(EMOTIONS):
        raise RavdessNameError(f"{Path(path).name}: unknown emotion code {emotion} (01-08)")
    if statement not in ("01", "02") or repetition not in ("01", "02") or not 1 <= int(actor) <= 24:
        raise RavdessNameError(f"{Path(path).name}: statement/repetition must be 01-02 and actor 01-24")
    return {
        "modality": MODALITIES[modality],
        "vocal_channel": VOCAL_CHANNELS[channel],
        "emotion": EMOTIONS[int(emotion) - 1],
        "intensity": INTENSITIES[intensity],
        "statement": int(statement),
        "repetition": int(repetition),
        "actor": int(actor),
    }


def index(root: str | Path) -> pd.DataFrame:
    """One row per RAVDESS audio file under `root`, sorted by path, with a content hash for grouping."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (get RAVDESS from {ZENODO_URL})")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{root}: no .wav or .flac files (get RAVDESS from {ZENODO_URL})")
    rows = [{"path": str(p), **parse_name(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths]
    return pd.DataFrame(rows)


def split(table: pd.DataFrame, protocol: str, validation_actors: Sequence[int] = ACTORS_VALIDATION) -> pd.Series:
    """'train' / 'validation' / 'test' for each row of an index table under a named protocol.

    `validation_actors` (actors protocol) moves the validation voices, e.g. to a cross-validation fold of 1-16;
    the test actors never move.
    """
    if protocol == "seed":
        return _seed_split(table)
    if protocol == "actors":
        check_validation_actors(validation_actors)
        sides = np.where(table["actor"].isin(ACTORS_TEST), "test", "train")
        sides = np.where(table["actor"].isin(validation_actors), "validation", sides)
        return pd.Series(sides, index=table.index, name="split")
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def check_validation_actors(actors: Sequence[int]) -> None:
    """Refuse validation voices that are empty, unknown, or taken from the test actors."""
    if not actors or len(set(actors)) != len(actors) or not all(1 <= a <= 24 for a in actors):
        raise ValueError(f"validation_actors: expected distinct actor numbers 1-24, got {list(actors)}")
    if set(actors) & set(ACTORS_TEST):
        raise ValueError(f"validation_actors: {list(actors)} overlaps the test actors {list(ACTORS_TEST)}")


def _seed_split(table: pd.DataFrame) -> pd.Series:
    from sklearn.model_selection import train_test_split  # here: scikit-learn costs every `ser` command 1 s

    # Split unique recordings (content hash), so byte-identical files always land on the same side.
    groups = table.drop_duplicates("sha256")
    train, test = train_test_split(groups, test_size=SEED_TEST_FRACTION, stratify=groups["emotion"], random_state=SEED)
    train, validation = train_test_split(
        train, test_size=SEED_VALIDATION_FRACTION, stratify=train["emotion"], random_state=SEED
    )
    side = {
        sha: name
        for name, part in (("train", train), ("validation", validation), ("test", test))
        for sha in part["sha256"]
    }
    return table["sha256"].map(side).rename("split")
