"""A labeling-job output folder written by the job's own store (`ser.store`): real schema, parts and manifests.

Only the rows are synthetic: two nightly runs over a small collection, the second relabeling some files,
adding new ones and keeping two errors, so "latest per file", "changes between runs" and "errors by reason"
all have something to find.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ser import store
from ser.ravdess import EMOTIONS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a fake microphone
ERRORS = {
    "clips/broken-0.wav": "not a readable audio file (Format not recognised)",
    "clips/silent-0.wav": "audio is silent (peak below -80 dBFS)",
}


def _at(day: int) -> dt.datetime:
    """A nightly run's start: 02:00 UTC on 2024-05-<day>."""
    return dt.datetime(2024, 5, day, 2, tzinfo=dt.UTC)


RUNS = (  # run id, start, files (besides ERRORS), files per second
    ("20240501T020000Z-a1b2c3", _at(1), [f"clips/clip-{i:02d}.wav" for i in range(14)], 3.0),
    ("20240502T020000Z-d4e5f6", _at(2), [f"clips/clip-{i:02d}.wav" for i in range(8, 20)], 4.5),
)


def _row(path: str, run_id: str, at: dt.datetime, rng: np.random.Generator) -> dict:
    """One output row; files named in ERRORS come out as errors, the others with random probabilities."""
    duration = float(rng.uniform(1.0, 40.0))
    probs = rng.dirichlet(np.full(len(EMOTIONS), 0.4))
    ok = path not in ERRORS
    return {
        "path": f"/data/{path}",
        "size_bytes": int(duration * 44100 * 2),
        "mtime": dt.datetime(2024, 4, 1, tzinfo=dt.UTC),
        "etag": None,
        "duration_s": duration if ok else None,
        "sample_rate": 22050 if ok else None,
        "channels": 1 if ok else None,
        "label": EMOTIONS[int(probs.argmax())] if ok else None,
        "confidence": float(probs.max()) if ok else None,
        **{column: float(p) if ok else None for column, p in zip(store.PROB_COLUMNS, probs, strict=True)},
        "n_windows": max(1, int((duration - 3) / 1.5) + 2) if ok else None,
        "processing_s": duration / 20 + float(rng.uniform(0, 0.1)),
        "status": "ok" if ok else "error",
        "error": ERRORS.get(path),
        "model_name": "ravdess-actors",
        "model_sha256": "0" * 64,
        "temperature": 0.7,
        "feature_config_hash": "abcdef0123456789",
        "run_id": run_id,
        "processed_at": at + dt.timedelta(seconds=float(rng.uniform(1, 60))),
    }


def write_results(out: Path, runs: tuple = RUNS, seed: int = 0) -> Path:
    """Commit the runs' parts and manifests under `out` with `ser.store`; returns `out`."""
    rng = np.random.default_rng(seed)
    location = store.Store(str(out), store.s3_options())
    seen: set[str] = set()
    for run_id, started, names, files_per_second in runs:
        rows = [_row(name, run_id, started, rng) for name in [*names, *ERRORS]]
        location.commit(pa.Table.from_pylist(rows, schema=store.SCHEMA), run_id, started.date().isoformat(), 0)
        n_error = sum(row["status"] == "error" for row in rows)
        wall = len(rows) / files_per_second
        location.write_manifest({
            "run_id": run_id,
            "status": "completed",
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": (started + dt.timedelta(seconds=wall)).isoformat(timespec="seconds"),
            "wall_seconds": wall,
            "files_per_second": files_per_second,
            "counts": {"listed": len(seen | set(names)) + len(ERRORS), "skipped": len(seen - set(names)),
                       "to_label": len(rows), "ok": len(rows) - n_error, "error": n_error},
            "model": {"name": "ravdess-actors", "sha256": "0" * 64},
        })
        location.discard_staging(run_id)
        seen.update(names)
    return out


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory) -> Path:
    """A labeling output folder: 2 runs, 16 + 14 rows, 2 errors per run, some labels changed between runs."""
    return write_results(tmp_path_factory.mktemp("results") / "out")


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (never a downloaded browser); skips when either is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()
