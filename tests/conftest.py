"""Shared fixtures: generated audio (no data needed), a tiny random-weight bundle, and RAVDESS when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
RAVDESS_DIR = (ROOT / ".." / "shared" / "data" / "ravdess").resolve()


def make_speechlike(seconds: float, sample_rate: int = 22050, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A voiced, pitch-gliding harmonic signal with a syllable envelope: (samples, channels) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate  # round: frames / rate * rate may fall just short
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.0 * t)) ** 2
    signal = 0.2 * voice * envelope + 0.005 * rng.standard_normal(t.size)
    return np.repeat(signal[:, None], channels, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float = 2.0, sample_rate: int = 22050, channels: int = 1, seed: int = 0,
                subtype: str | None = None, format: str | None = None) -> Path:
    """Write generated speech-like audio in whatever container the suffix (or `format`) names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, make_speechlike(seconds, sample_rate, channels, seed), sample_rate, subtype=subtype, format=format)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real bundle with a small random-weight model of the same architecture (fast to load and run)."""
    from ser import bundle, ravdess
    from ser.model import ModelConfig, build_model

    config = ModelConfig(conv_filters=(4, 8, 8), lstm_units=8)
    model = build_model(config)
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    card = {"name": "tiny-test", "run_id": "test", "classes": list(ravdess.EMOTIONS), "protocol": "seed",
            "model_config": config.to_dict(), "calibration": {"temperature": 1.5}}
    return bundle.save(path, model, np.float32(-40.0), np.float32(15.0), card)


@pytest.fixture(scope="session")
def ravdess_dir() -> Path:
    """The RAVDESS folder in ../shared; data-dependent tests skip cleanly without it."""
    if not (RAVDESS_DIR / "manifest.csv").is_file():
        pytest.skip(f"RAVDESS not found at {RAVDESS_DIR}")
    return RAVDESS_DIR


def write_ravdess_like(root: Path, n: int = 24, seconds: float = 2.0) -> list[Path]:
    """n generated clips named like RAVDESS speech: clip i has emotion i % 8 + 1 and actor i % 24 + 1."""
    names = [f"03-01-{i % 8 + 1:02d}-01-01-01-{i % 24 + 1:02d}.wav" for i in range(n)]
    return [write_audio(root / name, seconds, seed=i) for i, name in enumerate(names)]


@pytest.fixture(scope="session")
def local_ray():
    """One local 2-CPU Ray instance for the tests that need Ray, started as `ser train` starts its own (safe beside
    other Rays on the machine); shut down after the session."""
    import ray

    from ser import ray_logs

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, log_to_driver=False, **ray_logs.local_ray_options())
    yield ray
    if started:
        ray.shutdown()
