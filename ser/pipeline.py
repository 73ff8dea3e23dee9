"""The labeling job: list a collection -> read + features (CPU tasks) -> batched inference (actors) -> Parquet.

Everything streams through Ray Data: the driver holds the list of inputs (path, size, mtime) and at most
one commit chunk of result rows, never features. A file's windows travel together as one row
(n_windows, 128, 128) from `features.file_features` to an inference actor, which scores all windows of
its batch in one call and averages them per file exactly like `Predictor`. Results are committed in
chunks through `store.Store`, so a killed run keeps its finished chunks and the next run skips them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import os
import posixpath
import re
import socket
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ser import __version__, audio, bundle, features, store
from ser import config as config_io
from ser.predict import DEFAULT_BATCH_SIZE, Predictor, mean_by_file
from ser.ravdess import EMOTIONS

LIST_SUFFIXES = (".txt", ".lst", ".list")  # an INPUT file with one of these suffixes lists paths, one per line
GLOB_CHARS = "*?["
MAX_INPUT_BLOCKS = 20_000  # Ray Data blocks the input list is cut into, at most
DECODE_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
INFERENCE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3"}  # TensorFlow's C++ start-up chatter off, as in the `ser` commands
FEATURIZED = ("etag", "error", "duration_s", "sample_rate", "channels", "processing_s", "features", "starts")
ERROR_SAMPLE = 20  # error rows quoted in the manifest and the summary
ESCAPES_QUOTED = 5  # inputs outside --root named in the error
INTERRUPTED = ("the driver ended without recording an outcome (killed, its machine lost, or storage unreachable "
               "when it failed); parts it committed are kept, its unfinished part was discarded, and later runs "
               "label the files it did not commit")

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A missing INPUT or output, an INPUT that names nothing that exists, or GPUs the cluster does not have."""


class RunFailed(RuntimeError):
    """The run stopped part-way (storage or cluster failure); its committed parts stay, the next run goes on."""


@dataclass
class DecodeConfig:
    """Read + decode + resample + log-mel tasks (one CPU each, single-threaded math)."""

    batch_size: int = 32
    num_cpus: float = 1.0
    concurrency: int | None = None


@dataclass
class InferenceConfig:
    """The actor pool that holds the model."""

    batch_size: int = 64
    gpu_batch_size: int = 256
    window_batch_size: int = DEFAULT_BATCH_SIZE
    gpu_window_batch_size: int = 512
    min_actors: int | None = None
    max_actors: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None


@dataclass
class LabelConfig:
    """Everything `ser label` needs; configs/label.yaml documents each key."""

    input: str | None = None
    output: str | None = None
    root: str | None = None
    model: str | None = None
    suffixes: tuple[str, ...] | None = None
    force: bool = False
    retry_errors: bool = False
    segments: bool = False
    commit_every: int = 1000
    commit_seconds: float = 120.0
    low_confidence: float = 0.5
    progress: bool = True
    fused: bool | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    s3: store.S3Options = field(default_factory=store.S3Options)

    def __post_init__(self) -> None:
        positive = {
            "commit_every": self.commit_every,
            "commit_seconds": self.commit_seconds,
            "decode.batch_size": self.decode.batch_size,
            "decode.num_cpus": self.decode.num_cpus,
            "inference.batch_size": self.inference.batch_size,
            "inference.gpu_batch_size": self.inference.gpu_batch_size,
            "inference.window_batch_size": self.inference.window_batch_size,
            "inference.gpu_window_batch_size": self.inference.gpu_window_batch_size,
            "inference.min_actors": self.inference.min_actors,
            "inference.max_actors": self.inference.max_actors,
        }
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be positive, got {value}")
        lowest, highest = self.inference.min_actors, self.inference.max_actors
        if lowest is not None and highest is not None and highest < lowest:
            raise ValueError(f"inference.max_actors: {highest} is below min_actors")
        if not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError(f"low_confidence: expected a probability in [0, 1], got {self.low_confidence}")


# ---------------------------------------------------------------- listing


def glob_regex(pattern: str) -> re.Pattern:
    """Shell-style pattern -> regex: `*` and `?` stay within a path segment, `**/` spans segments."""
    out = ""
    for token in re.split(r"(\*\*/|\*|\?|\[[^\]]*\])", pattern):
        if token == "**/":
            out += "(?:.*/)?"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        elif token.startswith("[") and token.endswith("]") and len(token) > 2:
            body = token[1:-1]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
        else:
            out += re.escape(token)
    return re.compile(out)


def _row(fs: pafs.FileSystem, info: pafs.FileInfo) -> dict:
    found = info.type == pafs.FileType.File
    return {
        "path": store.to_uri(fs, info.path),
        "size_bytes": info.size if found else None,
        "mtime": store.utc_from_ns(info.mtime_ns) if found else None,
    }


def _walk_local(base: str) -> list[pafs.FileInfo]:
    """Everything but directories below local folder `base`, breadth-first and by name, skipping hidden names.

    Directory links are followed, but each directory (by device and inode) is entered once, so a link to a
    parent does not repeat its files. An entry that is no regular file, or whose link is dangling or a loop,
    is kept too (type Unknown or NotFound): the decode stage turns it into an error row with the reason.
    """
    facts = os.stat(base)
    seen, folders, infos = {(facts.st_dev, facts.st_ino)}, collections.deque([base]), []
    while folders:
        with os.scandir(folders.popleft()) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                facts = entry.stat()
            except OSError:
                infos.append(pafs.FileInfo(entry.path, pafs.FileType.NotFound))
                continue
            if stat.S_ISDIR(facts.st_mode):
                if (facts.st_dev, facts.st_ino) not in seen:
                    seen.add((facts.st_dev, facts.st_ino))
                    folders.append(entry.path)
            elif stat.S_ISREG(facts.st_mode):
                infos.append(pafs.FileInfo(entry.path, pafs.FileType.File, size=facts.st_size,
                                           mtime_ns=facts.st_mtime_ns))
            else:
                infos.append(pafs.FileInfo(entry.path, pafs.FileType.Unknown))
    return infos


def _walk(fs: pafs.FileSystem, base: str, suffixes: tuple[str, ...]) -> list[pafs.FileInfo]:
    """Entries below `base` ending in one of `suffixes` (lower case), recursively, skipping hidden names.

    On S3 these are the objects; a local walk also keeps the entries it cannot read (see `_walk_local`).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        infos = _walk_local(base)
    else:
        infos = [
            i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File and not any(p.startswith(".") for p in i.path[len(base) :].split("/"))
        ]
    return [i for i in infos if i.path.lower().endswith(suffixes)]


Location = tuple[pafs.FileSystem, str]


def _inside(root: Location, fs: pafs.FileSystem, path: str) -> bool:
    """Whether `path` lies inside the root folder or prefix (local symlinks resolved, `..` normalized)."""
    root_fs, base = root
    if type(fs) is not type(root_fs):
        return False
    if isinstance(fs, pafs.LocalFileSystem):
        path, base = os.path.realpath(path), os.path.realpath(base)
    else:  # S3 keys have no `..`, but a key that reads like one is refused all the same
        path, base = posixpath.normpath(path), posixpath.normpath(base)
    return path == base or path.startswith(base.rstrip("/") + "/")


def _refuse(what: str, root: Location, escapes: list[str]) -> None:
    """InputError naming the first inputs found outside --root, if any."""
    if escapes:
        more = f" and {len(escapes) - ESCAPES_QUOTED} more" if len(escapes) > ESCAPES_QUOTED else ""
        raise InputError(f"{what}: {len(escapes)} input(s) outside --root {store.to_uri(*root)}: "
                         f"{', '.join(escapes[:ESCAPES_QUOTED])}{more}")


def _listed(fs: pafs.FileSystem, path: str, s3: store.S3Options, root: Location | None) -> list[dict]:
    """Rows for the paths in a list file (blank lines and # comments skipped).

    Relative paths are relative to `root` when given, else to the list's folder. With `root`, a path outside
    it refuses the whole list (naming the lines) before anything is looked at.
    """
    with fs.open_input_stream(path) as handle:
        lines = handle.readall().decode("utf-8", errors="replace").splitlines()
    base = store.to_uri(*root) if root else store.to_uri(fs, posixpath.dirname(path))
    targets, escapes = [], []
    for number, line in enumerate((s.strip() for s in lines), start=1):
        if not line or line.startswith("#"):
            continue
        absolute = line.startswith(store.S3_SCHEME) or line.startswith("/") or line.startswith("~")
        target_fs, target = store.resolve(line if absolute else posixpath.join(base, line), s3)
        if root and not _inside(root, target_fs, target):
            escapes.append(f"line {number} {line!r}")
        targets.append((target_fs, target))
    if root:
        _refuse(store.to_uri(fs, path), root, escapes)
    return [_row(target_fs, target_fs.get_file_info(target)) for target_fs, target in targets]


def list_inputs(spec: str, s3: store.S3Options, exclude: str | None = None,
                suffixes: tuple[str, ...] | None = None, root: str | None = None) -> list[dict]:
    """INPUT -> rows {path, size_bytes, mtime}, sorted by path and unique.

    INPUT is a folder or `s3://bucket/prefix` (recursive), a glob, a list file (LIST_SUFFIXES) or one file.
    Paths below `exclude` (the output location) are left out; `suffixes` filters folder and glob listings.
    With `root` (a folder or prefix), every input must lie inside it, else InputError names those outside.
    """
    where = store.resolve(root, s3) if root else None
    if where and where[0].get_file_info(where[1]).type != pafs.FileType.Directory:
        raise InputError(f"--root {root}: no such folder or S3 prefix")
    fs, path = store.resolve(spec, s3)
    magic = [path.find(c) for c in GLOB_CHARS if c in path]
    wanted = tuple(s.lower() for s in suffixes) if suffixes else ("",)
    if magic:
        base = path[: min(magic)].rpartition("/")[0]
        pattern = glob_regex(path)
        rows = [_row(fs, i) for i in _walk(fs, base, wanted) if pattern.fullmatch(i.path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            rows = [_row(fs, i) for i in _walk(fs, path, wanted)]
        elif info.type == pafs.FileType.File and path.lower().endswith(LIST_SUFFIXES):
            rows = _listed(fs, path, s3, where)
        elif info.type == pafs.FileType.File:
            rows = [_row(fs, info)]
        else:
            raise InputError(f"{spec}: no such file, folder or S3 prefix")
    if where:  # folders and globs may hold symlinks that lead out
        _refuse(spec, where, [repr(r["path"]) for r in rows if not _inside(where, *store.resolve(r["path"], s3))])
    if exclude:
        rows = [r for r in rows if not r["path"].startswith(exclude.rstrip("/") + "/")]
    return sorted({r["path"]: r for r in rows}.values(), key=lambda r: r["path"])


# ---------------------------------------------------------------- the decode stage (Ray tasks)


REMOTE_IN_MEMORY_BYTES = 64 * 2**20  # remote objects up to this size are decoded from memory
SPOOL_CHUNK_BYTES = 8 * 2**20  # larger ones are copied to a local temp file this much at a time


def read_input(uri: str, s3: store.S3Options, spool: str) -> tuple[bytes | str, str]:
    """The input as `features.file_features` takes it, and its ETag ('' where the filesystem has none).

    A local file is its own path: it is decoded in place, streaming, never read whole. A remote object is
    read into memory up to REMOTE_IN_MEMORY_BYTES; a larger one is copied to the local file `spool` (unused
    for local inputs) and that path returned, so memory stays bounded and a storage error surfaces here (safe
    to retry), not as a short read in the middle of decoding.
    """
    fs, path = store.resolve(uri, s3)
    if isinstance(fs, pafs.LocalFileSystem):
        return path, ""
    with fs.open_input_stream(path) as stream:
        etag = (stream.metadata() or {}).get("ETag", b"").decode().strip('"')
        head = stream.read(REMOTE_IN_MEMORY_BYTES + 1)
        if len(head) <= REMOTE_IN_MEMORY_BYTES:
            return head, etag
        with open(spool, "wb") as out:
            out.write(head)
            while chunk := stream.read(SPOOL_CHUNK_BYTES):
                out.write(chunk)
    return spool, etag


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def featurize_one(uri: str, s3: store.S3Options) -> dict:
    """One input -> its features and audio facts, or the one-line reason it cannot be labeled."""
    started = time.perf_counter()
    result = {"etag": "", "error": "", "duration_s": math.nan, "sample_rate": 0, "channels": 0,
              "features": np.zeros((0, *features.FEATURE_SHAPE), np.float32), "starts": np.zeros(0)}
    try:
        with contextlib.ExitStack() as cleanup:
            spool = "" if not uri.startswith(store.S3_SCHEME) else str(
                Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ser-input-"))) / "input")
            data, result["etag"] = store.read_listed(read_input, uri, s3, spool)
            feats, starts, info = features.file_features(data)
        result |= {"duration_s": info.duration_s, "sample_rate": info.sample_rate, "channels": info.channels,
                   "features": feats, "starts": starts}
    except audio.DecodeError as exc:
        result["error"] = str(exc)
    except OSError as exc:
        result["error"] = f"cannot read: {_reason(exc)}"
    except Exception as exc:  # one odd file must never stop the job: it becomes an error row
        result["error"] = f"{type(exc).__name__}: {_reason(exc)}"
    return {**result, "processing_s": time.perf_counter() - started}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def featurize(batch: dict[str, np.ndarray], s3: store.S3Options) -> dict[str, np.ndarray]:
    """Ray Data task: a batch of {row, path} -> one row per file carrying all its windows."""
    import ray

    results = [featurize_one(str(uri), s3) for uri in batch["path"]]
    node = ray.get_runtime_context().get_node_id()
    out = {"row": batch["row"], "decode_node": np.asarray([node] * len(results))}
    for key in FEATURIZED:
        values = [r[key] for r in results]
        out[key] = _objects(values) if key in ("features", "starts") else np.asarray(values)
    return out


# ---------------------------------------------------------------- the inference stage (Ray actors)


def bundle_files(path: str | Path) -> tuple[dict[str, bytes], dict]:
    """A bundle's files (shipped to the actors through the object store) and its model card."""
    path = Path(path)
    card = bundle.read_card(path)
    names = (bundle.MODEL_FILE, bundle.MEAN_FILE, bundle.STD_FILE, bundle.CARD_FILE)
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise bundle.BundleError(f"{path}: missing {missing[0]}")
    files = {name: (path / name).read_bytes() for name in names}
    if hashlib.sha256(files[bundle.MODEL_FILE]).hexdigest() != card.get("files", {}).get(bundle.MODEL_FILE):
        raise bundle.BundleError(f"{path / bundle.MODEL_FILE}: sha256 does not match {bundle.CARD_FILE}")
    if tuple(card.get("classes", ())) != EMOTIONS:
        raise bundle.BundleError(f"{path}: classes {card.get('classes')} are not the 8 RAVDESS emotions")
    return files, card


class PredictorActor:
    """Ray Data actor: loads the model once, then labels batches of files, all their windows in one call."""

    def __init__(self, files: dict[str, bytes], window_batch_size: int, threads: int, segments: bool = False):
        """`files`: the bundle's files, or an ObjectRef to them (how the job passes them)."""
        import ray

        from ser.cli import import_tensorflow_quietly

        # Set here, not as a runtime_env: an actor without one starts in a worker Ray has already started.
        os.environ.update(INFERENCE_ENV)
        import_tensorflow_quietly()
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        if isinstance(files, ray.ObjectRef):
            files = ray.get(files)
        with tempfile.TemporaryDirectory(prefix="ser-model-") as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            self.predictor = Predictor(bundle.load(folder), batch_size=window_batch_size)
        self.node = ray.get_runtime_context().get_node_id()
        self.segments = segments

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats, starts = list(batch.pop("features")), batch.pop("starts")
        n_windows = np.asarray([len(f) for f in feats], dtype=np.int64)
        window_probs = self.predictor.probabilities(np.concatenate(feats))
        probs = mean_by_file(window_probs, np.repeat(np.arange(len(feats)), n_windows), len(feats))
        probs[n_windows == 0] = np.nan
        out = {**batch, "n_windows": n_windows, "probs": probs, "inference_node": np.asarray([self.node] * len(feats))}
        if self.segments:  # per-window values travel to the driver only when it writes segment rows
            out |= {"starts": starts, "window_probs": _objects(np.split(window_probs, np.cumsum(n_windows)[:-1]))}
        return out


class FusedActor(PredictorActor):
    """Ray Data actor for CPU-only clusters: decodes its batch of inputs and scores it in the same process,
    so the features (64 KiB per window) never cross processes and one actor per core does all the work."""

    def __init__(self, files: dict[str, bytes], window_batch_size: int, threads: int, s3: store.S3Options,
                 segments: bool = False):
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # what DECODE_ENV does for decode tasks, for the math libraries already loaded
        super().__init__(files, window_batch_size, threads, segments)
        self.s3 = s3

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(featurize(batch, self.s3))


# ---------------------------------------------------------------- the driver


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start an embedded local Ray; quiet Ray Data's own output."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the job draws its own files/s bar
    context.print_on_execution_start = False
    context.memory_usage_poll_interval_s = None  # a polling thread per task call, for stats the job never reads
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def inference_gpus(cfg: InferenceConfig, cluster_gpus: float) -> float:
    """GPUs per inference actor: cfg.num_gpus, or (when null) 1 if the cluster has GPUs, else 0.

    Raises InputError when the actor pool's minimum needs more GPUs than the cluster has: Ray would
    otherwise wait for them without end.
    """
    if cfg.num_gpus is None:
        return 1.0 if cluster_gpus > 0 else 0.0
    min_actors = cfg.min_actors or 1  # unset: GPU actors are not fused, so the pool starts with one
    needed = cfg.num_gpus * min_actors
    if needed > cluster_gpus:
        raise InputError(
            f"inference.num_gpus={cfg.num_gpus:g} with min_actors={min_actors} needs {needed:g} GPUs, but the "
            f"cluster has {cluster_gpus:g}; set inference.num_gpus=0 (CPU) or null (GPU when present)"
        )
    return cfg.num_gpus


def pool_size(cfg: InferenceConfig, fused: bool, gpus: float, cluster_cpus: float, blocks: int) -> tuple[int, int]:
    """(min, max) actors of the pool: as configured, else one actor, or, when CPU actors also decode (they
    then do all the work), one per `num_cpus` of the cluster's CPUs but no more than there are input blocks."""
    default = max(1, min(blocks, int(cluster_cpus // cfg.num_cpus))) if fused and not gpus else 1
    lowest = cfg.min_actors or min(default, cfg.max_actors or default)
    return lowest, cfg.max_actors or max(lowest, default)


def fuses(cfg: LabelConfig, gpus: float) -> bool:
    """Whether the actors decode too: as configured, else when they have no GPU (CPU-only clusters)."""
    return (not gpus) if cfg.fused is None else cfg.fused


def build_dataset(listing: list[dict], todo: list[int], cfg: LabelConfig, s3: store.S3Options,
                  files: dict[str, bytes]) -> tuple:
    """The lazy Ray Dataset: input rows -> features (tasks) -> per-file probabilities (actor pool), or, fused,
    input rows -> per-file probabilities in one pool of actors that decode and score; and that layout."""
    import ray

    resources = ray.cluster_resources()
    gpus = inference_gpus(cfg.inference, resources.get("GPU", 0.0))
    fused = fuses(cfg, gpus)
    items = [{"row": i, "path": listing[i]["path"]} for i in todo]
    blocks = min(MAX_INPUT_BLOCKS, max(1, math.ceil(len(items) / cfg.decode.batch_size)))
    lowest, highest = pool_size(cfg.inference, fused, gpus, resources.get("CPU", 1.0), blocks)
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    actor_kwargs = {
        "files": ray.put(files),  # by reference: the bundle (up to ~30 MB) is stored once, not in every task spec
        "window_batch_size": cfg.inference.gpu_window_batch_size if gpus else cfg.inference.window_batch_size,
        "threads": max(1, int(cfg.inference.num_cpus)),
        "segments": cfg.segments,
    }
    if fused:
        actor, batch_size = FusedActor, cfg.decode.batch_size
        actor_kwargs["s3"] = s3
    else:
        actor = PredictorActor
        batch_size = cfg.inference.gpu_batch_size if gpus else cfg.inference.batch_size
        dataset = dataset.map_batches(
            featurize,
            batch_size=cfg.decode.batch_size,
            fn_kwargs={"s3": s3},
            num_cpus=cfg.decode.num_cpus,
            concurrency=cfg.decode.concurrency,
            runtime_env={"env_vars": DECODE_ENV},
            batch_format="numpy",
        )
    layout = {"fused": fused, "min_actors": lowest, "max_actors": highest, "gpus_per_actor": gpus}
    return dataset.map_batches(
        actor,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lowest, max_size=highest),
        fn_constructor_kwargs=actor_kwargs,
        num_cpus=cfg.inference.num_cpus,
        num_gpus=gpus,
        batch_format="numpy",
    ), layout


class Committer:
    """Collects result rows on the driver and publishes them a chunk at a time, updating the manifest."""

    def __init__(self, out: store.Store, manifest: dict, cfg: LabelConfig):
        self.out, self.manifest, self.cfg = out, manifest, cfg
        self.run = {
            "run_id": manifest["run_id"],
            "feature_config_hash": manifest["feature_config_hash"],
            "model_name": manifest["model"]["name"],
            "model_sha256": manifest["model"]["sha256"],
            "temperature": manifest["model"]["temperature"],
        }
        self.pending: list[tuple[pa.Table, list, list]] = []
        self.rows = 0
        self.last = time.monotonic()
        self.labels: collections.Counter = collections.Counter()
        self.nodes: dict[str, set] = {"decode": set(), "inference": set()}

    def add(self, batch: dict[str, np.ndarray], listing: list[dict]) -> int:
        table = store.file_table(listing, batch, {**self.run, "processed_at": store.now()})
        windows = (list(batch["starts"]), list(batch["window_probs"])) if self.cfg.segments else ([], [])
        self.pending.append((table, *windows))
        self.nodes["decode"].update(batch["decode_node"].tolist())
        self.nodes["inference"].update(batch["inference_node"].tolist())
        self.rows += len(table)
        if self.rows >= self.cfg.commit_every or time.monotonic() - self.last >= self.cfg.commit_seconds:
            self.flush()
        return len(table)

    def flush(self) -> None:
        """Publish the pending rows as one part (segments first: the file part is what marks files done)."""
        if not self.pending:
            return
        table = pa.concat_tables([t for t, _, _ in self.pending])
        run_id, run_date, chunk = self.manifest["run_id"], self.manifest["run_date"], len(self.manifest["parts"])
        if self.cfg.segments:
            starts = [s for _, batch, _ in self.pending for s in batch]
            window_probs = [p for _, _, batch in self.pending for p in batch]
            segments = store.segment_table(table, starts, window_probs)
            self.manifest["segment_parts"].append(self.out.commit(segments, run_id, run_date, chunk, segments=True))
        self.manifest["parts"].append(self.out.commit(table, run_id, run_date, chunk))
        status = table.column("status").to_pylist()
        counts = self.manifest["counts"]
        counts["ok"] += status.count("ok")
        counts["error"] += status.count("error")
        self.labels.update(v for v in table.column("label").to_pylist() if v)
        errors = [
            {"path": p, "error": e}
            for p, e in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True) if e
        ]
        self.manifest["errors"] = (self.manifest["errors"] + errors)[:ERROR_SAMPLE]
        self.manifest["labels"] = dict(sorted(self.labels.items()))
        self.manifest["nodes"] = {k: sorted(v) for k, v in self.nodes.items()}
        self.out.write_manifest(self.manifest)
        self.pending, self.rows, self.last = [], 0, time.monotonic()


def _stamp(when=None) -> str:
    return (when or store.now()).isoformat(timespec="seconds")


def new_run_id() -> str:
    return store.now().strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _driver_alive(manifest: dict) -> bool:
    """Whether a 'running' manifest's driver is another live process on this host (that run is not over)."""
    driver = manifest.get("driver") or {}
    if driver.get("host") != socket.gethostname() or driver.get("pid") in (None, os.getpid()):
        return False  # on another host there is no telling: one run per output at a time is the rule
    try:
        os.kill(driver["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def recover(out: store.Store, run_id: str) -> list[str]:
    """Mark runs whose driver died (still 'running', driver gone) 'interrupted' and clean up their staging.

    Their manifests get the parts and counts actually committed (the kill may have come between a part and
    its manifest update) and the time they were last heard of. Returns the run ids marked.
    """
    manifests = {m["run_id"]: m for m in out.manifests()}
    busy = {r for r, m in manifests.items() if m.get("status") == "running" and _driver_alive(m)}
    marked = []
    for old_id, old in manifests.items():
        if old.get("status") != "running" or old_id in busy or old_id == run_id:
            continue
        parts = out.committed_parts(old_id)
        statuses = out.statuses(parts)
        old["counts"] |= {"ok": statuses.count("ok"), "error": statuses.count("error")}
        old |= {"status": "interrupted", "parts": parts, "segment_parts": out.committed_parts(old_id, segments=True),
                "interrupted": {"found_by": run_id, "found_at": _stamp(), "last_update": old.get("updated_at"),
                                "reason": INTERRUPTED}}
        out.write_manifest(old)
        marked.append(old_id)
    for leftover in out.staged_runs():
        if leftover not in busy:
            out.discard_staging(leftover)
    return marked


def _manifest(cfg: LabelConfig, card: dict, model_path: Path, run_id: str) -> dict:
    began = store.now()
    return {
        "run_id": run_id,
        "status": "running",
        "ser_version": __version__,
        "run_date": began.date().isoformat(),
        "started_at": _stamp(began),
        "finished_at": None,
        "input": store.redact(cfg.input),
        "output": store.redact(cfg.output),
        "driver": {"host": socket.gethostname(), "pid": os.getpid()},
        "recovered": [],
        "model": {"name": card["name"], "sha256": card["files"][bundle.MODEL_FILE],
                  "temperature": bundle.card_temperature(card), "path": str(model_path)},
        "feature_config_hash": features.feature_config_hash(),
        "config": store.redact(config_io.to_dict(cfg)),
        "counts": {"listed": 0, "skipped": 0, "to_label": 0, "ok": 0, "error": 0},
        "labels": {},
        "errors": [],
        "timings": {},
        "wall_seconds": None,
        "files_per_second": None,
        "parts": [],
        "segment_parts": [],
        "nodes": {"decode": [], "inference": []},
        "ray": None,
    }


def run(cfg: LabelConfig, address: str | None = None) -> dict:
    """Label every new or changed file of cfg.input into cfg.output; returns the run manifest.

    Raises InputError / bundle.BundleError / ValueError for usage problems, before any work starts.
    """
    from tqdm import tqdm

    if not cfg.input or not cfg.output:
        raise InputError("both INPUT and --output are required")
    started = time.perf_counter()
    s3 = store.s3_options(cfg.s3.endpoint_override, cfg.s3.region)
    model_path = Path(cfg.model) if cfg.model else bundle.DEFAULT_MODEL
    files, card = bundle_files(model_path)
    out = store.Store(cfg.output, s3)
    listing = store.retrying(list_inputs, cfg.input, s3, exclude=store.to_uri(out.fs, out.root),
                             suffixes=cfg.suffixes, root=cfg.root, what=f"listing {store.redact(cfg.input)}")
    manifest = _manifest(cfg, card, model_path, new_run_id())
    manifest["recovered"] = recover(out, manifest["run_id"])
    done = set() if cfg.force else out.committed_keys(manifest["model"]["sha256"], manifest["model"]["temperature"],
                                                       manifest["feature_config_hash"],
                                                       ok_only=cfg.retry_errors)
    todo = [i for i, row in enumerate(listing) if store.key_of(row) not in done]
    manifest["counts"] |= {"listed": len(listing), "skipped": len(listing) - len(todo), "to_label": len(todo)}
    manifest["timings"]["list_seconds"] = round(time.perf_counter() - started, 3)
    out.write_manifest(manifest)
    committer = Committer(out, manifest, cfg)
    labelling = time.perf_counter()
    try:
        if todo:
            connect(address)
            manifest["timings"]["ray_start_seconds"] = round(time.perf_counter() - labelling, 3)
            import ray

            manifest["ray"] = {"resources": ray.cluster_resources(), "nodes": len(ray.nodes())}
            dataset, manifest["ray"]["layout"] = build_dataset(listing, todo, cfg, s3, files)
            with tqdm(total=len(todo), unit="file", desc="labeling", disable=not cfg.progress, mininterval=1) as bar:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    bar.update(committer.add(batch, listing))
        committer.flush()
    except BaseException as exc:
        manifest |= {"status": "failed", "error": _reason(exc), "finished_at": _stamp()}
        try:
            out.write_manifest(manifest)
            out.discard_staging(manifest["run_id"])
        except OSError as also:  # storage is gone too: the next run finds this run 'running' and marks it
            log.warning("%s: could not record that run %s failed: %s", store.redact(cfg.output), manifest["run_id"],
                        _reason(also))
        if isinstance(exc, Exception) and not isinstance(exc, InputError):  # usage errors stay usage errors
            raise RunFailed(f"run {manifest['run_id']} failed: {_reason(exc)}; its committed parts are kept and "
                            "the next run labels the rest") from exc
        raise
    label_seconds = time.perf_counter() - labelling
    labeled = manifest["counts"]["ok"] + manifest["counts"]["error"]
    manifest["timings"]["label_seconds"] = round(label_seconds, 3)
    manifest |= {
        "status": "completed",
        "finished_at": _stamp(),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "files_per_second": round(labeled / label_seconds, 3) if labeled else None,
    }
    out.write_manifest(manifest)
    out.discard_staging(manifest["run_id"])
    return manifest


def summary(manifest: dict, output: str) -> str:
    """The end-of-run table."""
    counts = manifest["counts"]
    wall = manifest["wall_seconds"] or 0.0
    lines = [
        f"run {manifest['run_id']}  model {manifest['model']['name']}  ({manifest['status']})",
        f"{'files listed':<16}{counts['listed']:>10}",
        f"{'skipped':<16}{counts['skipped']:>10}   already labeled with this model (--force relabels)",
        f"{'labeled ok':<16}{counts['ok']:>10}",
        f"{'errors':<16}{counts['error']:>10}",
    ]
    for name, n in sorted(manifest["labels"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<14}{n:>10}   {n / max(counts['ok'], 1):6.1%}")
    rate = f"{manifest['files_per_second']:.2f} files/s while labeling" if manifest["files_per_second"] else ""
    lines += [f"{'wall time':<16}{wall:>9.1f}s   {rate}", f"output: {output}"]
    return "\n".join(lines)
