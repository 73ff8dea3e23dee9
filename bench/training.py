"""Training throughput: the Ray Train job with one worker against the same step in one plain process.

Both sides run `ser.training.build_step` and `ser.training.train_epoch` on the same cached features, for the
same epochs, with the same TensorFlow thread count. Samples/s counts the training steps only (not the
per-epoch validation) and leaves out the first epoch, which includes tracing the step function.
"""

from __future__ import annotations

import os
from pathlib import Path

from ser.model import ModelConfig
from ser.training import TrainConfig

TINY_MODEL = ModelConfig(conv_filters=(4, 8, 8), lstm_units=8)
WARMUP_EPOCHS = 1


def train_config(data: str | Path, work: Path, epochs: int, cache_dir: str, quick: bool) -> TrainConfig:
    """The run both sides make: RAVDESS actors protocol, no early stop; quick: a tiny model and small batches."""
    sizes = {"batch_size": 4, "model": TINY_MODEL} if quick else {}
    return TrainConfig(data_dir=str(data), protocol="actors", epochs=epochs, patience=epochs, cache_dir=cache_dir,
                       output=str(work / "train-model"), storage_path=str(work / "train-ray"), **sizes)


def threads(config: TrainConfig) -> int:
    """The TensorFlow threads of a worker: what `ser.training.train` gives one worker on this machine."""
    return config.cpus_per_worker or os.cpu_count() or 1


def steady_samples_per_s(history: list[dict]) -> dict:
    """Samples/s over the epochs after the warm-up ones, from records with samples_per_second and epoch_seconds."""
    timed = history[WARMUP_EPOCHS:] or history
    samples = sum(r["samples_per_second"] * r["epoch_seconds"] for r in timed)
    seconds = sum(r["epoch_seconds"] for r in timed)
    return {"epochs": len(history), "timed_epochs": len(timed), "samples": round(samples), "seconds": seconds,
            "samples_per_s": samples / seconds}


def with_ray_train(config: TrainConfig) -> dict:
    """`ser.training.train` on an embedded local Ray, one worker; its per-epoch history."""
    import logging

    import ray

    from ser import ray_logs, training

    ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, **ray_logs.local_ray_options())
    try:
        _, card = training.train(config)
    finally:
        ray.shutdown()
    return steady_samples_per_s(card["history"])


def plain(config: TrainConfig) -> dict:
    """The same epochs of the same step in this process, no Ray Train (features from the same cache)."""
    from ser.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    from ser import training

    tf.config.threading.set_intra_op_parallelism_threads(threads(config))
    tf.config.threading.set_inter_op_parallelism_threads(threads(config))
    table, feature_set = training.prepare(config)
    data = training.training_data(config, table, feature_set)
    n_files = len(set(data["file_index"][training.training_windows(data)].tolist()))
    _, _, step = training.build_step(config, tf.distribute.get_strategy(), n_files)
    history = []
    for epoch in range(config.epochs):
        _, steps, seconds = training.train_epoch(step, data, config, epoch)
        history.append({"samples_per_second": steps * config.batch_size / seconds, "epoch_seconds": seconds})
    return steady_samples_per_s(history)
