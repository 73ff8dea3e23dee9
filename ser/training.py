"""Training: RAVDESS -> cached features (Ray Data) -> distributed custom train step (Ray Train) -> bundle.

The recipe is the original notebook's: train-only normalization statistics, training-only augmentation
(Gaussian noise or a random 10% time mask), one-hot targets, balanced class weights with surprise x1.5,
categorical cross-entropy with label smoothing, Adam, early stopping on validation. Keras 3 `fit` does not
work under MultiWorkerMirroredStrategy inside Ray Train, so the step is written out with `strategy.run`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ser import audio, bundle, calibration, features, ravdess, ray_logs
from ser import config as config_io
from ser.model import ModelConfig
from ser.predict import normalize

FEATURE_BATCH = 16  # files per Ray Data feature task
EVAL_BATCH = 256
STATE_ARRAYS = "train_state.npz"  # an epoch checkpoint: weights, optimizer, kept epoch, averaging window
STATE_PROGRESS = "train_state.json"  # ... and where training stands (Progress)
RUN_FILE = "ser-train.json"  # in a run's folder: its id, configuration and data, for `ser train --resume`


@dataclass
class AugmentConfig:
    """Training-only augmentation, applied to normalized log-mels."""

    probability: float = 1.0  # share of training samples augmented in an epoch
    noise_std: float = 0.1  # Gaussian noise, in units of the normalized feature
    time_mask_fraction: float = 0.1  # width of the zeroed time slice
    freq_masks: int = 0  # SpecAugment: this many extra zeroed mel-band stripes per sample ...
    freq_mask_max: int = 16  # ... each up to this many bands wide
    time_masks: int = 0  # SpecAugment: this many extra zeroed time stripes per sample ...
    time_mask_max: int = 16  # ... each up to this many frames wide
    mixup_alpha: float = 0.0  # mixup: Beta(alpha, alpha) blend of pairs of samples and targets; 0 = off
    speeds: tuple[float, ...] = ()  # speed perturbation: extra copies of every file at these speeds (e.g. 0.9, 1.1)
    pitch_shifts: tuple[float, ...] = ()  # pitch perturbation: extra copies moved this many semitones (e.g. -3, 3)

    def perturbations(self) -> list[audio.Perturbation]:
        """The audio each file's features are extracted from: the original first, then every perturbed copy."""
        return [audio.Perturbation(), *(audio.Perturbation(speed=speed) for speed in self.speeds),
                *(audio.Perturbation(semitones=semitones) for semitones in self.pitch_shifts)]


@dataclass
class TrainConfig:
    """Everything `ser train` needs; configs/train.yaml documents each key."""

    data_dir: str = "../shared/data/ravdess"
    protocol: str = "actors"
    validation_actors: tuple[int, ...] = ravdess.ACTORS_VALIDATION  # actors protocol: the held-out validation voices
    output: str = "runs/models/ravdess-{protocol}"
    name: str = "ravdess-{protocol}"
    num_workers: int = 1
    cpus_per_worker: int | None = None
    use_gpu: bool = False
    epochs: int = 35
    batch_size: int = 32
    learning_rate: float = 0.001
    lr_schedule: str = "constant"  # constant, or cosine (decay to 5% over the maximum epochs)
    label_smoothing: float = 0.1
    patience: int = 8
    max_minutes: float | None = None  # wall-clock budget of each member's epochs: the epoch ending past it is the last
    keep: str = "best"  # best: the best validation epoch (early stopping); last: the final epoch, no selection
    average_checkpoints: int = 1  # validate, early-stop on and ship the mean weights of the last N epochs
    surprise_weight: float = 1.5
    normalization: str = "global"
    seed: int = 42
    ensemble: int = 1  # members trained with seeds seed, seed+1, ...; the bundle averages their logits
    distill_from: str | None = None  # teacher bundle (same protocol and data): train on its soft targets too
    distill_weight: float = 0.7  # share of the target taken from the teacher's probabilities
    distill_temperature: float = 2.0  # softmax temperature of the teacher's logits for those targets
    max_files: int | None = None
    cache_dir: str = "~/.cache/ser/features"
    storage_path: str = "runs/ray"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if any(not 0.5 <= speed <= 2.0 or speed == 1.0 for speed in self.augment.speeds):
            raise ValueError(f"augment.speeds: expected factors in [0.5, 2] other than 1, got {self.augment.speeds}")
        if any(not 0 < abs(semitones) <= 12 for semitones in self.augment.pitch_shifts):
            raise ValueError("augment.pitch_shifts: expected semitones in [-12, 12] other than 0, got "
                             f"{self.augment.pitch_shifts}")
        if self.protocol not in ravdess.PROTOCOLS:
            raise ValueError(f"protocol: unknown {self.protocol!r}; choose one of {', '.join(ravdess.PROTOCOLS)}")
        ravdess.check_validation_actors(self.validation_actors)
        if self.protocol != "actors" and self.validation_actors != ravdess.ACTORS_VALIDATION:
            raise ValueError("validation_actors: only the actors protocol holds out validation voices")
        if self.normalization not in ("global", "per_band"):
            raise ValueError(f"normalization: expected 'global' or 'per_band', got {self.normalization!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep: expected 'best' or 'last', got {self.keep!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes: expected a budget above 0 minutes, got {self.max_minutes}")
        if self.average_checkpoints < 1:
            raise ValueError(f"average_checkpoints: expected at least 1 epoch, got {self.average_checkpoints}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble: expected at least 1 member, got {self.ensemble}")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight: expected a share in (0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature: expected > 0, got {self.distill_temperature}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must divide evenly over {self.num_workers} workers")


# ---------------------------------------------------------------- data


@dataclass
class FeatureSet:
    """Windows of every indexed file: features (n_windows, 128, 128) and the owning row of each window."""

    features: np.ndarray
    file_index: np.ndarray
    n_original: int | None = None  # windows before the perturbed copies (None: all are original)

    def original(self) -> np.ndarray:
        """Whether each window comes from the unperturbed audio."""
        n = len(self.features) if self.n_original is None else self.n_original
        return np.arange(len(self.features)) < n


def data_fingerprint(table: pd.DataFrame) -> str:
    """Hash of (relative path, content hash) over the index: identifies the exact training data."""
    root = os.path.commonpath(table["path"].tolist()) if len(table) > 1 else ""
    lines = sorted(f"{os.path.relpath(p, root)} {s}" for p, s in zip(table["path"], table["sha256"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _featurize(
    batch: dict[str, np.ndarray], perturbation: audio.Perturbation = audio.Perturbation()
) -> dict[str, np.ndarray]:
    """Ray Data stage: paths -> one row per window (the shared feature stage, nothing else)."""
    rows, feats = [], []
    for row, path in zip(batch["row"], batch["path"], strict=True):
        window_feats, _, _ = features.file_features(str(path), perturbation)
        rows.extend([row] * len(window_feats))
        feats.append(window_feats)
    return {"row": np.asarray(rows, dtype=np.int64), "features": np.concatenate(feats)}


def extract_features(
    table: pd.DataFrame, cache_dir: str | Path, perturbation: audio.Perturbation = audio.Perturbation()
) -> FeatureSet:
    """Features for every row of `table` (of its audio perturbed by `perturbation`), computed once with Ray Data
    and cached."""
    import ray

    key = f"{data_fingerprint(table)[:16]}-{features.feature_config_hash()}{perturbation.cache_suffix()}"
    cache = Path(cache_dir).expanduser() / key
    if (cache / "features.npy").is_file():
        return FeatureSet(np.load(cache / "features.npy"), np.load(cache / "file_index.npy"))
    items = [{"row": i, "path": p} for i, p in enumerate(table["path"])]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // FEATURE_BATCH)).map_batches(
        _featurize, batch_size=FEATURE_BATCH, batch_format="numpy", fn_kwargs={"perturbation": perturbation}
    )
    rows, feats = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        feats.append(batch["features"])
    file_index, stacked = np.concatenate(rows), np.concatenate(feats).astype(np.float32)
    order = np.argsort(file_index, kind="stable")
    result = FeatureSet(stacked[order], file_index[order])
    tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
    np.save(tmp / "features.npy", result.features)
    np.save(tmp / "file_index.npy", result.file_index)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not cache.exists():
        shutil.move(str(tmp), cache)
    return result


def class_weights(labels: np.ndarray, n_classes: int, surprise_weight: float) -> np.ndarray:
    """'balanced' weights n / (k * count) over the training labels (a class absent from them gets n / k),
    with the surprised class scaled up."""
    weights = len(labels) / (n_classes * np.maximum(np.bincount(labels, minlength=n_classes), 1.0))
    weights[ravdess.EMOTIONS.index("surprised")] *= surprise_weight
    return weights.astype(np.float32)


def normalization_stats(feats: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over training windows: one scalar ('global') or one per mel band ('per_band')."""
    axes = (0, 1, 2) if mode == "global" else (0, 2)
    mean = feats.mean(axis=axes, dtype=np.float64)
    std = feats.std(axis=axes, dtype=np.float64) + 1e-6
    shape = () if mode == "global" else (features.N_MELS, 1)
    return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)


def augment(batch: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Per sample, with probability p: Gaussian noise OR a zeroed random time slice (50/50)."""
    batch = batch.copy()
    width = max(1, round(features.N_FRAMES * config.time_mask_fraction))
    for sample in batch:
        if rng.random() >= config.probability:
            continue
        if rng.random() < 0.5:
            sample += rng.normal(0.0, config.noise_std, sample.shape).astype(np.float32)
        else:
            start = rng.integers(0, features.N_FRAMES - width + 1)
            sample[:, start : start + width] = 0.0
    for sample in batch:
        for axis, count, widest in (
            (0, config.freq_masks, config.freq_mask_max),
            (1, config.time_masks, config.time_mask_max),
        ):
            for _ in range(count):
                size = rng.integers(0, widest + 1)
                start = rng.integers(0, sample.shape[axis] - size + 1)
                sample[(slice(None),) * axis + (slice(start, start + size),)] = 0.0
    return batch


def mixup(x: np.ndarray, y: np.ndarray, w: np.ndarray, rng: np.random.Generator, alpha: float):
    """Blend each sample, one-hot target and loss weight with a random partner (Zhang et al. 2018)."""
    lam = rng.beta(alpha, alpha, size=len(x)).astype(np.float32)
    partner = rng.permutation(len(x))

    def blend(values: np.ndarray) -> np.ndarray:
        weight = lam.reshape(-1, *[1] * (values.ndim - 1))
        return weight * values + (1 - weight) * values[partner]

    return blend(x), blend(y), blend(w)


def one_window_per_file(file_of_window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one random window per file, shuffled: every epoch sees each file once, at a random offset."""
    order = rng.permutation(len(file_of_window))
    _, first = np.unique(file_of_window[order], return_index=True)
    chosen = order[first]
    rng.shuffle(chosen)
    return chosen


def mean_weights(checkpoints: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
    """Checkpoint averaging: the element-wise mean of several epochs' weights (BatchNorm statistics too)."""
    per_variable = zip(*checkpoints, strict=True)
    return [np.mean(values, axis=0, dtype=np.float64).astype(values[0].dtype) for values in per_variable]


# ---------------------------------------------------------------- the worker loop


def learning_rate_schedule(config: TrainConfig, n_train_files: int):
    """Adam's learning rate: a constant, or cosine decay to 5% over the maximum number of steps."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    import keras

    total_steps = max(1, config.epochs * (n_train_files // config.batch_size))
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=total_steps, alpha=0.05)


def _window_logits(model, feats: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = [
        model(normalize(feats[i : i + EVAL_BATCH], mean, std), training=False).numpy()
        for i in range(0, len(feats), EVAL_BATCH)
    ]
    return np.concatenate(out)


def _file_scores(window_logits: np.ndarray, owner: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    probs = calibration.file_probabilities(window_logits, owner, len(labels), temperature)
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "nll": calibration.nll(probs, labels),
        "ece": calibration.expected_calibration_error(probs, labels),
    }


def validation_view(data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation windows (unperturbed), the validation file (0..n-1) owning each, and the validation files' labels."""
    sides, owner = data["sides"], data["file_index"]
    val_files = np.flatnonzero(sides == "validation")
    val_windows = np.flatnonzero((sides[owner] == "validation") & data["original"])
    return val_windows, np.searchsorted(val_files, owner[val_windows]), data["labels"][val_files]


def calibrate(model, data: dict) -> dict:
    """Fit the temperature on validation; the card entries recording it and the scores before and after."""
    val_windows, val_owner, val_labels = validation_view(data)
    val_logits = _window_logits(model, data["features"][val_windows], data["mean"], data["std"])
    temperature = calibration.fit_temperature(val_logits, val_owner, val_labels)
    return {
        "validation": {
            "before_calibration": _file_scores(val_logits, val_owner, val_labels),
            "after_calibration": _file_scores(val_logits, val_owner, val_labels, temperature),
        },
        "calibration": {"method": "temperature", "temperature": temperature, "fit_on": "validation"},
    }


def training_windows(data: dict) -> np.ndarray:
    """Indices of the windows of the training files in `data`, perturbed copies included (see
    `training_data`): an epoch's one window per file is drawn from all of them."""
    return np.flatnonzero(data["sides"][data["file_index"]] == "train")


def build_step(config: TrainConfig, strategy, n_train_files: int):
    """Seed, then build the model, its optimizer (variables created, so a resumed run can load them) and its
    compiled step under `strategy`: step(x, y, w) -> the global mean loss.

    Ray Train workers and the plain single-process reference of bench/ run this same step.
    """
    import keras
    import tensorflow as tf

    from ser.model import build_model

    keras.utils.set_random_seed(config.seed)
    global_batch = config.batch_size
    with strategy.scope():
        model = build_model(config.model)
        optimizer = keras.optimizers.Adam(learning_rate_schedule(config, n_train_files))
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing, reduction="none"
        )

    def step(x, y, w):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(y, model(x, training=True)) * w
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=False))
        return loss

    @tf.function(reduce_retracing=True)
    def distributed_step(x, y, w):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y, w)), axis=None)

    return model, optimizer, distributed_step


def train_epoch(distributed_step, data: dict, config: TrainConfig, epoch: int, rank: int = 0,
                world: int = 1) -> tuple[float, int, float]:
    """This rank's steps of one epoch (one random window per training file): (mean loss, steps, seconds)."""
    import tensorflow as tf

    started = time.perf_counter()
    feats, owner, labels = data["features"], data["file_index"], data["labels"]
    train_windows = training_windows(data)
    eye = np.eye(config.model.n_classes, dtype=np.float32)
    local_batch = config.batch_size // world
    rng = np.random.default_rng(config.seed * 1000 + epoch)  # same on every worker: same epoch order
    chosen = one_window_per_file(owner[train_windows], rng)
    steps = len(chosen) // config.batch_size
    mine = chosen[rank::world][: steps * local_batch]
    worker_rng = np.random.default_rng((config.seed, epoch, rank))
    total = 0.0
    for s in range(steps):
        idx = train_windows[mine[s * local_batch : (s + 1) * local_batch]]
        x = augment(normalize(feats[idx], data["mean"], data["std"]), worker_rng, config.augment)
        y, w = eye[labels[owner[idx]]], data["class_weights"][labels[owner[idx]]]
        if data.get("soft_targets") is not None:
            y = (1 - config.distill_weight) * y + config.distill_weight * data["soft_targets"][idx]
        if config.augment.mixup_alpha > 0:
            x, y, w = mixup(x, y, w, worker_rng, config.augment.mixup_alpha)
        total += float(distributed_step(tf.constant(x), tf.constant(y), tf.constant(w)))
    return total / max(steps, 1), steps, time.perf_counter() - started


@dataclass
class Progress:
    """Where a worker's training stands after an epoch: what an epoch checkpoint restores, besides weights."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the history record of the epoch the bundle would keep
    since_best: int = 0
    seconds: float = 0.0  # wall time of the epoch loop so far, across resumes (what max_minutes counts)
    resumed_after: list[dict] = field(default_factory=list)  # each resume: {"epoch": epochs_done, "loop_seconds"}


def save_state(folder: Path, model, optimizer, progress: Progress, best_weights: list[np.ndarray],
               recent: Sequence[list[np.ndarray]]) -> None:
    """An epoch checkpoint: every model and optimizer variable (random-seed states and Adam's step count
    included), the kept epoch's weights, the checkpoint-averaging window, and `progress`."""
    arrays = {f"model_{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays |= {f"optimizer_{i}": v.numpy() for i, v in enumerate(optimizer.variables)}
    arrays |= {f"best_{i}": w for i, w in enumerate(best_weights)}
    arrays |= {f"recent_{j}_{i}": w for j, weights in enumerate(recent) for i, w in enumerate(weights)}
    np.savez(folder / STATE_ARRAYS, **arrays)
    (folder / STATE_PROGRESS).write_text(json.dumps(dataclasses.asdict(progress)))


def load_state(folder: Path, model, optimizer) -> tuple[Progress, list[np.ndarray], list[list[np.ndarray]]]:
    """Restore `save_state`'s variables into `model` and `optimizer` (built alike); the progress, the kept
    epoch's weights and the averaging window."""
    with np.load(folder / STATE_ARRAYS) as arrays:
        saved = dict(arrays)
    for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
        for i, variable in enumerate(variables):
            variable.assign(saved[f"{prefix}_{i}"])
    best = [saved[f"best_{i}"] for i in range(len(model.weights))]
    recent = []
    while f"recent_{len(recent)}_0" in saved:
        recent.append([saved[f"recent_{len(recent)}_{i}"] for i in range(len(model.weights))])
    return Progress(**json.loads((folder / STATE_PROGRESS).read_text())), best, recent


@contextlib.contextmanager
def _rank_zero_checkpoint(rank: int, write: Callable[[Path], None]):
    """A Ray Train checkpoint of a temporary folder that `write` fills, on rank 0; None on the other ranks
    (rank 0's copy is the run's). The folder is gone once the report that uploads it returns."""
    import ray.train

    if rank != 0:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ser-checkpoint-") as folder:
        write(Path(folder))
        yield ray.train.Checkpoint.from_directory(folder)


def train_loop_per_worker(cfg: dict) -> None:
    """Runs on each Ray Train worker: custom distributed step, early stopping, calibration, bundle checkpoint.

    Each epoch but the last reports a checkpoint of the whole training state, so a run restarted under the
    same Ray Train run name (`ser train --resume`) goes on after the last epoch it finished; the last
    epoch's checkpoint is the bundle."""
    import ray
    import ray.train
    import tensorflow as tf

    config: TrainConfig = cfg["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = cfg["threads"]
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)

    data = ray.get(cfg["data"])
    feats, owner, mean, std = data["features"], data["file_index"], data["mean"], data["std"]
    train_windows = training_windows(data)
    val_windows, val_owner, val_labels = validation_view(data)

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    model, optimizer, distributed_step = build_step(config, strategy, len(np.unique(owner[train_windows])))
    progress, best_weights = Progress(), None
    recent = collections.deque(maxlen=config.average_checkpoints)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            progress, best_weights, window = load_state(Path(folder), model, optimizer)
        recent.extend(window)
        progress.resumed_after.append({"epoch": progress.epochs_done, "loop_seconds": round(progress.seconds, 1)})
        if rank == 0:
            print(f"resuming after epoch {progress.epochs_done}/{config.epochs}", flush=True)
    loop_started = time.monotonic() - progress.seconds
    for epoch in range(progress.epochs_done, config.epochs):
        train_loss, steps, seconds = train_epoch(distributed_step, data, config, epoch, rank, world)
        if config.average_checkpoints > 1:  # validate (and keep) the average; training goes on from the raw weights
            recent.append(model.get_weights())
            model.set_weights(mean_weights(recent))
        scores = _file_scores(_window_logits(model, feats[val_windows], mean, std), val_owner, val_labels)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_accuracy": scores["accuracy"],
            "val_nll": scores["nll"],
            "epoch_seconds": seconds,
            "samples_per_second": steps * config.batch_size / seconds,
        }
        progress.history.append(record)
        if rank == 0:
            print(
                f"epoch {record['epoch']:>3}/{config.epochs}  loss {record['train_loss']:.4f}  "
                f"val acc {record['val_accuracy']:.4f}  val nll {record['val_nll']:.4f}  {seconds:.1f}s",
                flush=True,
            )
        # keep=last leaves validation out of every choice, so the temperature fitted on it is not biased by selection
        best = progress.best
        better = best is None or (scores["accuracy"], -scores["nll"]) > (best["val_accuracy"], -best["val_nll"])
        if better or config.keep == "last":
            progress.best, best_weights, progress.since_best = record, model.get_weights(), 0
        else:
            progress.since_best += 1
        if config.average_checkpoints > 1:
            model.set_weights(recent[-1])
        progress.epochs_done, progress.seconds = epoch + 1, time.monotonic() - loop_started
        stopped_by = _stop_reason(config, epoch, progress)
        if stopped_by is None:
            state = functools.partial(save_state, model=model, optimizer=optimizer, progress=progress,
                                      best_weights=best_weights, recent=recent)
            with _rank_zero_checkpoint(rank, state) as checkpoint:
                ray.train.report(record, checkpoint=checkpoint)
            continue
        model.set_weights(best_weights)
        card = {**cfg["card"], "history": progress.history, "best_epoch": progress.best["epoch"],
                "stopped_by": stopped_by, "resumed_after": progress.resumed_after,
                "epoch_loop_seconds": round(progress.seconds, 1), **calibrate(model, data)}
        write_bundle = functools.partial(bundle.save, model=model, mean=mean, std=std, card=card)
        with _rank_zero_checkpoint(rank, write_bundle) as checkpoint:
            ray.train.report({**record, "val_accuracy_best": progress.best["val_accuracy"]}, checkpoint=checkpoint)
        break


def _stop_reason(config: TrainConfig, epoch: int, progress: Progress) -> str | None:
    """The option that ends training after this (0-based) epoch, or None to go on. Validation and epoch counts
    agree on every worker; their clocks do not, so rank 0's reading of the time budget decides for all."""
    if progress.since_best >= config.patience:
        return "patience"
    if epoch + 1 == config.epochs:
        return "epochs"
    if config.max_minutes is not None:
        from ray.train.collective import broadcast_from_rank_zero

        if broadcast_from_rank_zero(progress.seconds >= 60 * config.max_minutes):
            return "max_minutes"
    return None


# ---------------------------------------------------------------- the driver


def prepare(config: TrainConfig, table: pd.DataFrame | None = None) -> tuple[pd.DataFrame, FeatureSet]:
    """Index the data (unless the caller passes its `ravdess.index(config.data_dir)` as `table`), split it
    under the protocol, and extract (or load cached) features, the perturbed copies of `augment.speeds` and
    `augment.pitch_shifts` appended after the original windows."""
    table = ravdess.index(config.data_dir) if table is None else table.copy()
    table["split"] = ravdess.split(table, config.protocol, config.validation_actors)
    if config.max_files:  # a small, deterministic subset for smoke tests
        per_side = max(1, config.max_files // 3)
        parts = [part.sample(min(len(part), per_side), random_state=config.seed) for _, part in table.groupby("split")]
        table = pd.concat(parts).sort_values("path").reset_index(drop=True)
    sets = [extract_features(table, config.cache_dir, perturbation) for perturbation in config.augment.perturbations()]
    if len(sets) == 1:
        return table, sets[0]
    stacked = [np.concatenate([getattr(s, name) for s in sets]) for name in ("features", "file_index")]
    return table, FeatureSet(*stacked, n_original=len(sets[0].features))


def training_data(config: TrainConfig, table: pd.DataFrame, feature_set: FeatureSet) -> dict:
    """What every worker trains on: windows and their files, labels, sides, train-only statistics, class weights."""
    labels = table["emotion"].map(ravdess.EMOTIONS.index).to_numpy()
    sides = table["split"].to_numpy()
    original = feature_set.original()
    train_mask = (sides[feature_set.file_index] == "train") & original  # statistics of the unperturbed audio
    mean, std = normalization_stats(feature_set.features[train_mask], config.normalization)
    return {
        "features": feature_set.features,
        "file_index": feature_set.file_index,
        "original": original,
        "labels": labels,
        "sides": sides,
        "mean": mean,
        "std": std,
        "class_weights": class_weights(labels[sides == "train"], config.model.n_classes, config.surprise_weight),
    }


def teacher_targets(config: TrainConfig, fingerprint: str, data: dict) -> tuple[np.ndarray, dict]:
    """Knowledge distillation (Hinton et al. 2015): the teacher bundle's probabilities at
    `distill_temperature` for every training window (perturbed copies included; zeros elsewhere),
    computed once on the unaugmented features, and the card entry naming the teacher.

    The teacher must have been trained under the same protocol on the same files, so its targets carry no
    knowledge of the validation or test files; `fingerprint` is this run's `data_fingerprint`."""
    from ser.predict import softmax

    teacher = bundle.load(config.distill_from)
    expected = {"protocol": config.protocol, "data_fingerprint": fingerprint}
    found = {key: teacher.card.get(key) for key in expected}
    if found != expected:
        raise bundle.BundleError(f"{config.distill_from}: a teacher must be trained on this protocol's split of "
                                 f"the same data; it has {found}, this run {expected}")
    windows = training_windows(data)
    soft = np.zeros((len(data["features"]), config.model.n_classes), dtype=np.float32)
    logits = _window_logits(teacher.model, data["features"][windows], teacher.mean, teacher.std)
    soft[windows] = softmax(logits, config.distill_temperature)
    entry = {"teacher": teacher.name, "teacher_run_id": teacher.card["run_id"], "teacher_sha256": teacher.sha256,
             "weight": config.distill_weight, "temperature": config.distill_temperature}
    return soft, entry


def _fit(config: TrainConfig, data_ref, card: dict, run_name: str, target: Path) -> Path:
    """One Ray Train run of `train_loop_per_worker`; its best bundle is copied to `target`. A run name that
    already has epoch checkpoints under `storage_path` goes on after the last of them."""
    import ray
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    cpus = config.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // config.num_workers)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "data": data_ref, "card": card, "threads": cpus},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(config.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest epoch's state, then the bundle
            # One line per epoch on the console: Ray Train's own INFO lines stay in its log files (see ray_logs for
            # the one that escapes this level), and its print patch, which would echo each print a second time
            # through a logger, is off.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a model checkpoint: {result.error}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint_dir, target)
    # Ray Train keeps one epoch checkpoint, but leaves behind one an interruption cut off before it was recorded,
    # and those a resumed run started from; the bundle is what remains of a finished run.
    for state in Path(config.storage_path).resolve().glob(f"{run_name}/checkpoint_*/{STATE_PROGRESS}"):
        shutil.rmtree(state.parent)
    return target


class ResumeError(Exception):
    """A run that cannot be resumed as asked."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C; `folder` is the run folder `ser train --resume` goes on with (None: the run
    was stopped before its record was written, so there is nothing to resume)."""

    def __init__(self, folder: Path | None):
        super().__init__(f"interrupted: go on with: ser train --resume {folder}" if folder
                         else "interrupted before the run was recorded: start it again")
        self.folder = folder


def new_run_id() -> str:
    """A run id: UTC start time and a random suffix (names the Ray Train run folder and the bundle's run)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_folder(config: TrainConfig, run_id: str) -> Path:
    """Where run `run_id` keeps its Ray Train checkpoints and RUN_FILE (an ensemble's members: beside it)."""
    return Path(config.storage_path).resolve() / run_id


def _finished(target: Path, run_id: str) -> bool:
    return (target / bundle.CARD_FILE).exists() and bundle.read_card(target).get("run_id") == run_id


def train(config: TrainConfig, address: str | None = None, resumed: dict | None = None) -> tuple[Path, dict]:
    """Run the Ray Train job (once per ensemble member); returns the bundle folder and its model card.

    `resumed`, the RUN_FILE record of an interrupted run (see `resume`), goes on where it stopped: finished
    ensemble members are kept, the others continue after their last finished epoch. Ctrl-C raises
    `Interrupted`, which names the run folder to resume."""
    run_id = resumed["run_id"] if resumed else new_run_id()
    folder = run_folder(config, run_id)
    try:
        return _train(config, address, resumed, run_id, folder)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ray Train's SIGINT handler aborts the run with SystemExit
        raise Interrupted(folder if (folder / RUN_FILE).exists() else None) from exc


def _train(config: TrainConfig, address: str | None, resumed: dict | None, run_id: str,
           folder: Path) -> tuple[Path, dict]:
    import ray

    name = config.name.format(protocol=config.protocol)
    output = Path(config.output.format(protocol=config.protocol, run_id=run_id))
    if not ray.is_initialized():
        ray.init(address=address, **ray_logs.local_ray_options())  # joining a cluster: its own dashboard counts
    started = time.perf_counter()
    table, feature_set = prepare(config)
    data = training_data(config, table, feature_set)
    fingerprint = data_fingerprint(table)
    if resumed:
        recorded = resumed["data_fingerprint"]
        if recorded != fingerprint:
            raise ResumeError(f"{config.data_dir}: the data changed since run {run_id} started (fingerprint "
                             f"{recorded[:12]} then, {fingerprint[:12]} now); start a new run instead")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        run = {"run_id": run_id, "cwd": os.getcwd(), "data_fingerprint": fingerprint,
               "config": config_io.to_dict(config)}
        (folder / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
        print(f"run {run_id}; if it is interrupted, go on with: ser train --resume {folder}", flush=True)
    distillation = None
    if config.distill_from:
        data["soft_targets"], distillation = teacher_targets(config, fingerprint, data)
    sides = data["sides"]
    data_ref = ray.put(data)
    # The recipe as the user gave it: a resumed run's config has its relative paths made absolute to run.
    recipe = config_io.to_dict(config_io.build(TrainConfig, resumed["config"]) if resumed else config)
    card = {
        "name": name,
        "run_id": run_id,
        "classes": list(ravdess.EMOTIONS),
        "model_config": config.model.to_dict(),
        "train_config": recipe,
        "protocol": config.protocol,
        "split": {side: int((sides == side).sum()) for side in ("train", "validation", "test")},
        "test_actors": sorted(ravdess.ACTORS_TEST) if config.protocol == "actors" else None,
        "validation_actors": sorted(config.validation_actors) if config.protocol == "actors" else None,
        "data_fingerprint": fingerprint,
        "n_files": len(table),
        "n_windows": int(feature_set.original().sum()),
        "num_workers": config.num_workers,
        **({"distillation": distillation} if distillation else {}),
    }
    if config.ensemble == 1:
        _fit(config, data_ref, card, run_id, output)
    else:
        members = []
        for i in range(config.ensemble):
            member = dataclasses.replace(config, seed=config.seed + i, ensemble=1)
            member_card = {**card, "run_id": f"{run_id}-member{i}",
                           "train_config": recipe | {"seed": member.seed, "ensemble": 1}}
            target = folder / "members" / f"seed-{member.seed}"
            if not _finished(target, member_card["run_id"]):
                _fit(member, data_ref, member_card, member_card["run_id"], target)
            members.append(target)
        combine(members, output, data, card)
    final = bundle.read_card(output)
    final["train_seconds"] = round(time.perf_counter() - started, 1)
    bundle.write_card(output, final)
    return output, final


def resume(folder: Path, address: str | None = None) -> tuple[Path, dict]:
    """Go on with the interrupted `ser train` run whose run folder (printed when it started) is `folder`,
    under its own configuration; a run that already finished just returns its bundle.

    Relative paths in that configuration are taken from the directory the run was started in."""
    folder = Path(folder)
    if not (folder / RUN_FILE).exists():
        raise ResumeError(f"{folder}: not a `ser train` run folder (no {RUN_FILE}); the folder to resume "
                                "is printed when a run starts: <storage_path>/<run id>")
    run = json.loads((folder / RUN_FILE).read_text())
    values = run["config"] | {"storage_path": str(folder.resolve().parent)}  # where the run folder is now
    for key in ("data_dir", "output", "cache_dir", "distill_from"):
        if values.get(key) and not os.path.isabs(os.path.expanduser(values[key])):
            values[key] = os.path.join(run["cwd"], values[key])
    config = config_io.build(TrainConfig, values)
    output = Path(config.output.format(protocol=config.protocol, run_id=run["run_id"]))
    if _finished(output, run["run_id"]):
        return output, bundle.read_card(output)
    return train(config, address, resumed=run)


# Statistics recomputed from the same files agree to ~1e-7 relative across machines (their FFT and BLAS
# round differently), so members trained elsewhere on the same split still combine.
STATS_RTOL = 1e-5


def _base_members(loaded: bundle.Bundle) -> list[tuple[object, dict]]:
    """A bundle's base models with their summaries; an ensemble bundle contributes each of its members, so an
    ensemble grown from another weighs every base model alike."""
    nested = bundle.ensemble_members(loaded.card)
    if nested:
        import keras

        models = [layer for layer in loaded.model.layers if isinstance(layer, keras.Model)]
        return list(zip(models, nested, strict=True))
    card = loaded.card
    summary = {
        "run_id": card["run_id"],
        "seed": card["train_config"]["seed"],
        "best_epoch": card["best_epoch"],
        "epochs_run": len(card["history"]),
        "stopped_by": card.get("stopped_by"),  # None: trained before cards recorded it
        "resumed_after": card.get("resumed_after"),  # None: trained before runs could be resumed
        "epoch_loop_seconds": card.get("epoch_loop_seconds"),
        "validation_accuracy": card["validation"]["after_calibration"]["accuracy"],
        "model_sha256": loaded.sha256,
        "train_seconds": card.get("train_seconds"),
    }
    return [(loaded.model, summary)]


def _recipe_changes(member: dict, recorded: dict) -> dict:
    """The training options in which a member (its train_config with today's defaults filled in) differs
    from the ensemble's recorded train_config."""
    own = {"seed", "output", "ensemble", "storage_path", "cache_dir"}
    return {key: value for key, value in member.items() if key not in own and recorded.get(key) != value}


def combine(members: list[Path], output: Path, data: dict, card: dict) -> Path:
    """One bundle averaging the logits of member bundles trained on the same split and statistics;
    its temperature is fitted again on validation. Members that are ensembles are flattened."""
    from ser.model import average_logits

    models, summary = [], []
    for path in members:
        member = bundle.load(path)
        same_stats = all(np.allclose(ours, theirs, rtol=STATS_RTOL, atol=0.0)
                         for ours, theirs in ((member.mean, data["mean"]), (member.std, data["std"])))
        if member.card["data_fingerprint"] != card["data_fingerprint"] or not same_stats:
            raise bundle.BundleError(f"{member.path}: trained on other data or statistics than the ensemble")
        changes = _recipe_changes(config_io.to_dict(config_io.build(TrainConfig, member.card["train_config"])),
                                  card["train_config"])
        for model, entry in _base_members(member):
            models.append(model)
            summary.append(entry | ({"train_config_changes": changes} if changes else {}))
    model = average_logits(models)
    entries = {**card, "ensemble": {"combine": "mean of logits", "members": summary}, **calibrate(model, data)}
    return bundle.save(output, model, data["mean"], data["std"], entries)


def ensemble_bundles(members: list[Path], output: Path, cache_dir: str | None = None) -> tuple[Path, dict]:
    """`ser ensemble`: combine bundles trained separately (same protocol and recipe, different seeds)."""
    cards = [bundle.read_card(path) for path in members]
    first = cards[0]
    base_cards = [base for member in cards for base in bundle.ensemble_members(member) or [member]]  # flattened
    values = dict(first["train_config"], ensemble=len(base_cards))
    if cache_dir:
        values["cache_dir"] = cache_dir
    config = config_io.build(TrainConfig, values)
    table, feature_set = prepare(config)
    data = training_data(config, table, feature_set)
    card = {
        key: first[key]
        for key in ("name", "classes", "model_config", "protocol", "split", "test_actors", "data_fingerprint",
                    "n_files", "n_windows", "num_workers")
    }
    card["validation_actors"] = sorted(config.validation_actors) if config.protocol == "actors" else None
    card["run_id"] = "ensemble-" + "+".join(base["run_id"] for base in base_cards)
    card["train_config"] = config_io.to_dict(config)
    out = combine(members, output, data, card)
    return out, bundle.read_card(out)


# ---------------------------------------------------------------- a temperature cross-fitted over voice folds


def _held_out(
    loaded: bundle.Bundle, cache_dir: str | None, index: Callable[[str], pd.DataFrame]
) -> tuple[TrainConfig, list[calibration.HeldOut], object]:
    """A bundle's recipe, its validation files scored by each of its base models (weights summing to 1, so
    each fold of voices counts once however many models hold it out), and scored by the bundle itself."""
    values = dict(loaded.card["train_config"], **({"cache_dir": cache_dir} if cache_dir else {}))
    config = config_io.build(TrainConfig, values)
    table, feature_set = prepare(config, index(config.data_dir))
    data = training_data(config, table, feature_set)
    windows, owner, labels = validation_view(data)
    feats = data["features"][windows]
    logits = [_window_logits(model, feats, loaded.mean, loaded.std) for model, _ in _base_members(loaded)]
    members = [calibration.HeldOut(member, owner, labels, 1 / len(logits)) for member in logits]
    itself = calibration.HeldOut(np.mean(logits, axis=0), owner, labels)  # what the ensemble's Average layer does
    return config, members, itself


def _pooled_scores(pairs: list[tuple[calibration.HeldOut, float]]) -> dict:
    """File NLL and ECE over held-out sets, each scored at its own temperature, pooled with the sets' weights."""
    probs, labels, weights = calibration.pool(pairs)
    return {"nll": calibration.nll(probs, labels, weights),
            "ece": calibration.expected_calibration_error(probs, labels, weights=weights)}


def held_out_check(folds: list[list[calibration.HeldOut]], alone: list[float]) -> dict:
    """Each fold of voices held out in turn: scored at the temperature of one other fold (today's practice,
    over every other fold; `alone` holds each fold's own, `fit_pooled_temperature(fold)`) and at the
    temperature pooled over all the other folds."""
    one, others = [], []
    for j, fold in enumerate(folds):
        rest = [held for i, other in enumerate(folds) if i != j for held in other]
        pooled = calibration.fit_pooled_temperature(rest)
        others += [(held, pooled) for held in fold]
        one += [(held, alone[i]) for i in range(len(folds)) if i != j for held in fold]
    return {"one_fold_temperature": _pooled_scores(one), "other_folds_temperature": _pooled_scores(others)}


def cross_fit(target: Path, folds: list[Path], cache_dir: str | None = None) -> dict:
    """The card entries of `ser calibrate --cross-fit`: the target's validation temperature T_B times
    T_all / T_val, where T_all is one temperature for single models over every fold of held-out voices (the
    target's members on its validation actors, each fold bundle on its own) and T_val the same over the
    target's validation actors alone."""
    loaded = bundle.load(target)
    if loaded.card["protocol"] != "actors":
        raise bundle.BundleError(f"{target}: cross-fitting holds out voices; it needs an actors-protocol bundle")
    index = functools.cache(ravdess.index)  # hashing the data once, however many bundles were trained on it
    config, members, itself = _held_out(loaded, cache_dir, index)
    folds_seen = [(config.validation_actors, {"bundle": str(target), "run_id": loaded.card["run_id"],
                                              "model_sha256": loaded.sha256}, members)]
    for path in folds:
        fold = bundle.load(path)
        fold_config, fold_members, _ = _held_out(fold, cache_dir, index)
        changes = _recipe_changes(config_io.to_dict(fold_config), loaded.card["train_config"])
        changes.pop("validation_actors", None)
        changes.pop("name", None)
        if fold.card["data_fingerprint"] != loaded.card["data_fingerprint"] or changes:
            raise bundle.BundleError(f"{path}: not the target's recipe on the same data (differs in "
                                     f"{sorted(changes) or 'data_fingerprint'}); a fold must differ only in its voices")
        if any(set(actors) & set(fold_config.validation_actors) for actors, _, _ in folds_seen):
            raise bundle.BundleError(f"{path}: validation actors {list(fold_config.validation_actors)} are held "
                                     "out by another bundle already; folds must not overlap")
        entry = {"bundle": str(path), "run_id": fold.card["run_id"], "model_sha256": fold.sha256}
        folds_seen.append((fold_config.validation_actors, entry, fold_members))
    groups = [group for _, _, group in folds_seen]
    t_bundle = calibration.fit_temperature(itself.window_logits, itself.file_index, itself.labels)
    t_all = calibration.fit_pooled_temperature([held for group in groups for held in group])
    alone = [calibration.fit_pooled_temperature(group) for group in groups]
    t_val = alone[0]  # the target's own validation actors
    temperature = float(np.clip(t_bundle * t_all / t_val, *calibration.TEMPERATURE_BOUNDS))
    fold_rows = [
        {
            "validation_actors": sorted(actors),
            **entry,
            "files": len(group[0].labels),
            "accuracy": float(np.mean([(h.probabilities(1.0).argmax(1) == h.labels).mean() for h in group])),
            "single_model_temperature": t,
        }
        for (actors, entry, group), t in zip(folds_seen, alone, strict=True)
    ]
    validation = dict(loaded.card.get("validation", {}))
    validation["after_cross_fit"] = _file_scores(itself.window_logits, itself.file_index, itself.labels, temperature)
    return {
        "validation": validation,
        "calibration": {
            "method": "temperature",
            "temperature": temperature,
            "fit_on": f"validation, cross-fitted over {len(groups)} folds of held-out actors",
            "validation_temperature": t_bundle,
            "cross_fit": {
                "factor": t_all / t_val,
                "single_model_temperature_all_folds": t_all,
                "single_model_temperature_validation_fold": t_val,
                "folds": fold_rows,
                "held_out_check": held_out_check(groups, alone),
            },
        },
    }


def calibrate_bundle(target: Path, folds: list[Path], output: Path | None = None,
                     cache_dir: str | None = None) -> tuple[Path, dict]:
    """`ser calibrate`: write the cross-fitted temperature into `output`'s model.json (a copy of the target's
    bundle; the target itself when no output is given). The weights do not change."""
    entries = cross_fit(target, folds, cache_dir)
    output = Path(output or target)
    if output.resolve() != Path(target).resolve():
        shutil.copytree(target, output, dirs_exist_ok=False)
    card = bundle.read_card(output) | entries
    bundle.write_card(output, card)
    return output, card
