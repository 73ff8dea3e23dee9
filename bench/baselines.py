"""The two references `ser label` is measured against: the per-file loop, and this machine's ideal.

Per-file loop: what users of the original notebook do, one file at a time in one process:
`librosa.load(sr=22050)` -> 3 s windows -> log-mel -> normalize -> `model.predict`, TensorFlow's default
threads (all cores). It does the same work per file as the job (same trimming, windows and features).

Ideal: the two stages timed serially on one core (affinity pinned, one BLAS/OpenMP/TensorFlow thread):
t_feat = seconds per file of `features.file_features`, t_infer = seconds per file of batched inference at
the best batch size. With perfect overlap and no overhead, `cores` such cores label cores / (t_feat + t_infer)
files per second; no schedule of these two stages on this machine can do better.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WARMUP_FILES = 2
MIN_TIMED_SECONDS = 2.0  # each batch size is timed over repeated passes for at least this long
BATCHES_PER_PASS = 4  # one timed pass scores this many full batches


def _load_bundle(model: str | Path, threads: int | None = None):
    """Import TensorFlow quietly, set its thread pools (None: its default, all cores), load the bundle."""
    from ser.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    from ser import bundle

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    return bundle.load(model)


def per_file_loop(paths: list[Path], model: str | Path) -> dict:
    """Label `paths` one by one like the original; the model load and warm-up files are not timed."""
    import librosa

    from ser import audio, features
    from ser.predict import normalize

    loaded = _load_bundle(model)

    def label(path: Path) -> None:
        samples, _ = librosa.load(path, sr=audio.SAMPLE_RATE)
        frames, _ = audio.windows(samples)
        loaded.model.predict(normalize(features.log_mel_batch(frames), loaded.mean, loaded.std), verbose=0)

    for path in paths[:WARMUP_FILES]:
        label(path)
    started = time.perf_counter()
    for path in paths:
        label(path)
    seconds = time.perf_counter() - started
    return {"files": len(paths), "seconds": seconds, "files_per_s": len(paths) / seconds}


def pin_to_one_core() -> int:
    """Run this process on one core with single-threaded math libraries; returns the core."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    os.environ.update(ONE_THREAD_ENV)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    return core


def _seconds_per_pass(run, minimum: float = MIN_TIMED_SECONDS) -> float:
    """Mean seconds of `run()` over as many passes as fit in `minimum` seconds (at least one), after a warm-up."""
    run()
    passes, started = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - started < minimum:
        run()
        passes += 1
    return (time.perf_counter() - started) / passes


def ideal(paths: list[Path], model: str | Path, batch_sizes: tuple[int, ...], cores: int,
          seconds: float = MIN_TIMED_SECONDS) -> dict:
    """t_feat and t_infer per file on one core, inference at each batch size, and the ideal files/s."""
    core = pin_to_one_core()
    import numpy as np

    from ser import features
    from ser.predict import Predictor

    started = time.perf_counter()
    loaded = _load_bundle(model, threads=1)
    model_load = time.perf_counter() - started  # TensorFlow's import and the bundle: every actor's start-up
    for path in paths:
        path.read_bytes()  # the page cache holds every file, as it does for the job's runs
    for path in paths[:WARMUP_FILES]:
        features.file_features(str(path))
    started = time.perf_counter()
    windows = np.concatenate([features.file_features(str(path))[0] for path in paths])
    t_feat = (time.perf_counter() - started) / len(paths)
    windows_per_file = len(windows) / len(paths)
    per_window = {}
    for size in batch_sizes:
        predictor = Predictor(loaded, batch_size=size)
        batch = windows[np.arange(size * BATCHES_PER_PASS) % len(windows)]  # full batches, cycling the windows
        per_window[size] = _seconds_per_pass(lambda p=predictor, b=batch: p.probabilities(b), seconds) / len(batch)
    best = min(per_window, key=per_window.get)
    t_infer = per_window[best] * windows_per_file
    return {
        "core": core,
        "cores": cores,
        "files": len(paths),
        "windows_per_file": windows_per_file,
        "t_feat_s": t_feat,
        "t_infer_s": t_infer,
        "best_batch_size": best,
        "t_infer_window_s_by_batch": {str(k): v for k, v in per_window.items()},
        "files_per_s": cores / (t_feat + t_infer),
        "model_load_s": model_load,
    }
