"""The labeling job's output: a pinned Parquet schema, atomic publishing, the skip index and run manifests.

Layout of an output location OUT (a local folder or `s3://bucket/prefix`):

    OUT/run_date=YYYY-MM-DD/part-<run_id>-<chunk>.parquet    one row per input file (the dataset)
    OUT/_segments/run_date=YYYY-MM-DD/part-<run_id>-<chunk>.parquet    one row per 3 s window (--segments)
    OUT/_runs/<run_id>.json                                   the run manifest
    OUT/_staging/<run_id>/                                    parts being written (never read)

Dataset discovery ignores names starting with `_` or `.`, so `pandas.read_parquet(OUT)` sees committed
parts only. A part is written whole under `_staging/` and then moved to its final name: a rename on a
local disk, a server-side copy on S3 (an object appears complete or not at all). Rows are only ever
appended: a file relabeled because it changed (or with --force) gets a newer row; take the latest per path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ser import audio
from ser.ravdess import EMOTIONS

PARTITION = "run_date"
STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
SEGMENTS_DIR = "_segments"
S3_SCHEME = "s3://"
SCHEMA_VERSION = "2"  # 2: the temperature column
PROB_COLUMNS = tuple(f"prob_{name}" for name in EMOTIONS)
SKIP_KEY = ("path", "size_bytes", "mtime")  # with the model hash, temperature and feature hash: "already labeled"
REDACTED = "***"
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|private", re.IGNORECASE)
# Storage operations are retried on transient errors (connection refused or reset, 5xx, throttling) with
# exponential backoff: 0.5, 1, 2, 4 s between the RETRY_ATTEMPTS tries, about 10 s in all with the S3 client's
# own quick retries. Missing objects and denied access are final at once. An input that still cannot be read
# becomes an error row saying GAVE_UP, and the next run tries it again (it is not "already labeled").
RETRY_ATTEMPTS = 5
RETRY_FIRST_DELAY_S = 0.5
GAVE_UP = "gave up after"
_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|SLOW_DOWN|THROTTLING|REQUEST_TIMEOUT)"
    r"|HTTP status 5\d\d|curlCode"
)
GONE = "no longer exists (deleted or moved after listing)"

log = logging.getLogger(__name__)
T = TypeVar("T")

UTC_US = pa.timestamp("us", tz="UTC")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _field(name: str, kind: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, kind, nullable=nullable, metadata={"description": doc})


SCHEMA = pa.schema(
    [
        _field("path", pa.string(), "absolute local path or s3://bucket/key of the input", nullable=False),
        _field("size_bytes", pa.int64(), "input size when listed"),
        _field("mtime", UTC_US, "input modification time when listed (S3: LastModified)"),
        _field("etag", pa.string(), "S3 ETag of the object read; null for local files"),
        _field("duration_s", pa.float64(), "duration of the decoded audio in seconds"),
        _field("sample_rate", pa.int32(), "sample rate of the file (before resampling)"),
        _field("channels", pa.int32(), "channels in the file (mixed down to mono)"),
        _field("label", pa.string(), "predicted emotion: argmax of the prob_* columns; null on error"),
        _field("confidence", pa.float64(), "calibrated probability of the label"),
        *(_field(c, pa.float64(), f"calibrated probability of {c[5:]}; the 8 sum to 1") for c in PROB_COLUMNS),
        _field("n_windows", pa.int32(), "3 s windows (hop 1.5 s) averaged into the label"),
        _field("processing_s", pa.float64(), "seconds spent reading and decoding the file and computing its features"),
        _field("status", pa.string(), "ok or error", nullable=False),
        _field("error", pa.string(), "one-line reason when status is error"),
        _field("model_name", pa.string(), "model bundle name", nullable=False),
        _field("model_sha256", pa.string(), "sha256 of the bundle's model.keras", nullable=False),
        _field("temperature", pa.float64(), "the bundle's calibration temperature dividing the logits (model.json); "
               "null in rows written before schema version 2"),
        _field("feature_config_hash", pa.string(), "hash of the feature stage settings", nullable=False),
        _field("run_id", pa.string(), "the run that wrote the row (manifest in _runs/<run_id>.json)", nullable=False),
        _field("processed_at", UTC_US, "when the row was committed", nullable=False),
    ],
    metadata={"ser.schema_version": SCHEMA_VERSION},
)

SEGMENT_SCHEMA = pa.schema(
    [
        _field("path", pa.string(), "input path, as in the file table", nullable=False),
        _field("window", pa.int32(), "window index within the file, from 0", nullable=False),
        _field("start_s", pa.float64(), "window start in seconds"),
        _field("end_s", pa.float64(), "window end in seconds (start + 3, capped at the duration)"),
        _field("label", pa.string(), "argmax of the window's prob_* columns"),
        _field("confidence", pa.float64(), "calibrated probability of the window label"),
        *(_field(c, pa.float64(), f"calibrated probability of {c[5:]} in this window") for c in PROB_COLUMNS),
        _field("run_id", pa.string(), "the run that wrote the row; join to the file table on path + run_id",
               nullable=False),
    ],
    metadata={"ser.schema_version": SCHEMA_VERSION},
)


@dataclass(frozen=True)
class S3Options:
    """Where S3 is: the endpoint (MinIO, moto, ...) and region. Credentials are never part of it."""

    endpoint_override: str | None = None
    region: str | None = None


def s3_options(endpoint_override: str | None = None, region: str | None = None) -> S3Options:
    """Fill unset options from AWS_ENDPOINT_URL and AWS_REGION / AWS_DEFAULT_REGION."""
    env = os.environ
    return S3Options(
        endpoint_override=endpoint_override or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    )


@lru_cache(maxsize=8)
def _s3(options: S3Options) -> pafs.S3FileSystem:
    """One S3 client per process and options; credentials come from the standard AWS chain of this process."""
    kwargs = {"endpoint_override": options.endpoint_override, "region": options.region}
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v})


def resolve(uri: str, s3: S3Options) -> tuple[pafs.FileSystem, str]:
    """`s3://bucket/key` or a local path -> (filesystem, path within it)."""
    if uri.startswith(S3_SCHEME):
        return _s3(s3), uri[len(S3_SCHEME) :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of `resolve`: what the `path` column holds."""
    return S3_SCHEME + path if isinstance(fs, pafs.S3FileSystem) else path


def transient(exc: BaseException) -> bool:
    """Whether a storage error may go away by itself: S3 unreachable, throttling, server errors."""
    return (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)
            and bool(_TRANSIENT.search(str(exc))))


def retrying(fn: Callable[..., T], *args, what: str, **kwargs) -> T:
    """`fn(*args, **kwargs)`, tried again with exponential backoff while it fails with a transient error.

    Only for operations that are safe to repeat. After the last try the error is re-raised as one OSError
    line saying what was tried, how often and for how long.
    """
    started, attempt = time.monotonic(), 1
    while True:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if not transient(exc):
                raise
            reason = str(exc).strip().splitlines()[0]
            if attempt == RETRY_ATTEMPTS:
                raise OSError(f"{what}: {GAVE_UP} {attempt} tries in {time.monotonic() - started:.0f} s: "
                              f"{reason}") from exc
            delay = RETRY_FIRST_DELAY_S * 2 ** (attempt - 1)
            attempt += 1
            log.warning("%s: transient storage error, try %d of %d in %.1f s: %s", what, attempt, RETRY_ATTEMPTS,
                        delay, reason)
            time.sleep(delay)


def read_listed(read: Callable[..., T], uri: str, *args) -> T:
    """`read(uri, *args)` for a listed input, with retries; FileNotFoundError says the file is gone."""
    try:
        return retrying(read, uri, *args, what=f"reading {redact(uri)}")
    except FileNotFoundError:
        raise FileNotFoundError(GONE) from None


def redact(value):
    """Copy of a config-like value with secret-looking keys masked and URL credentials removed."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))
    return value


# ---------------------------------------------------------------- building tables


def _null_if(values, missing) -> list:
    return [None if v == missing or (isinstance(v, float) and np.isnan(v)) else v for v in values]


def file_table(listing: list[dict], result: dict[str, np.ndarray], run: dict) -> pa.Table:
    """Rows of the pinned SCHEMA from the driver's listing and one batch of the job's results.

    `result` holds per-file arrays: row (index into listing), etag, error ('' when ok), duration_s,
    sample_rate, channels, n_windows, processing_s, probs (n, 8, NaN on error). `run` holds model_name, model_sha256,
    temperature, feature_config_hash, run_id and processed_at.
    """
    rows = [listing[i] for i in result["row"]]
    probs = np.asarray(result["probs"], dtype=np.float64).reshape(len(rows), len(EMOTIONS))
    ok = np.asarray(result["error"]) == ""
    best = np.where(ok, np.nan_to_num(probs).argmax(axis=1), 0)
    columns = {
        "path": [r["path"] for r in rows],
        "size_bytes": [r["size_bytes"] for r in rows],
        "mtime": [r["mtime"] for r in rows],
        "etag": _null_if(result["etag"], ""),
        "duration_s": _null_if(result["duration_s"], None),
        "sample_rate": _null_if(result["sample_rate"], 0),
        "channels": _null_if(result["channels"], 0),
        "label": [EMOTIONS[b] if good else None for b, good in zip(best, ok, strict=True)],
        "confidence": [float(p[b]) if good else None for p, b, good in zip(probs, best, ok, strict=True)],
        **{c: _null_if(probs[:, i], None) for i, c in enumerate(PROB_COLUMNS)},
        "n_windows": _null_if(result["n_windows"], 0),
        "processing_s": result["processing_s"],
        "status": ["ok" if good else "error" for good in ok],
        "error": _null_if(result["error"], ""),
        **{k: [run[k]] * len(rows) for k in ("model_name", "model_sha256", "temperature", "feature_config_hash",
                                              "run_id")},
        "processed_at": [run["processed_at"]] * len(rows),
    }
    return pa.table(columns, schema=SCHEMA)


def segment_table(files: pa.Table, starts: list[np.ndarray], window_probs: list[np.ndarray]) -> pa.Table:
    """One row per window of the ok files in `files` (aligned with their window starts and probabilities)."""
    paths, durations, run_ids = (files.column(c).to_pylist() for c in ("path", "duration_s", "run_id"))
    keep = [i for i, s in enumerate(files.column("status").to_pylist()) if s == "ok"]
    probs = np.concatenate([np.asarray(window_probs[i]).reshape(-1, len(EMOTIONS)) for i in keep] or
                           [np.zeros((0, len(EMOTIONS)))])
    start = np.concatenate([np.asarray(starts[i], dtype=np.float64) for i in keep] or [np.zeros(0)])
    owner = np.concatenate([np.full(len(starts[i]), i) for i in keep] or [np.zeros(0, int)]).astype(int)
    window = np.concatenate([np.arange(len(starts[i])) for i in keep] or [np.zeros(0, int)])
    best = probs.argmax(axis=1)
    columns = {
        "path": [paths[i] for i in owner],
        "window": window.astype(np.int32),
        "start_s": start,
        "end_s": np.minimum(start + audio.CLIP_SECONDS, [durations[i] for i in owner]),
        "label": [EMOTIONS[b] for b in best],
        "confidence": probs[np.arange(len(best)), best],
        **{c: probs[:, i] for i, c in enumerate(PROB_COLUMNS)},
        "run_id": [run_ids[i] for i in owner],
    }
    return pa.table(columns, schema=SEGMENT_SCHEMA)


# ---------------------------------------------------------------- the output location


class Store:
    """An output location: reads the committed dataset and publishes parts and manifests atomically."""

    def __init__(self, uri: str, s3: S3Options):
        self.uri = uri.rstrip("/") or uri
        self.fs, self.root = resolve(uri, s3)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # gone already: a retried delete
            self.fs.delete_file(path)

    def _publish(self, data: bytes, final: str, run_id: str) -> str:
        """Write `data` under the run's staging folder, then move it to `final` in one step."""
        staging = self._path(STAGING_DIR, run_id, posixpath.basename(final))
        if isinstance(self.fs, pafs.LocalFileSystem):  # an atomic rename; local errors are never transient
            self.fs.create_dir(posixpath.dirname(staging), recursive=True)
            self.fs.create_dir(posixpath.dirname(final), recursive=True)
            self._write(staging, data)
            self.fs.move(staging, final)
            return final
        # S3: upload, server-side copy (the object appears whole or not at all), delete; each safe to repeat
        where = to_uri(self.fs, final)
        retrying(self._write, staging, data, what=f"uploading {where}")
        retrying(self.fs.copy_file, staging, final, what=f"publishing {where}")
        retrying(self._delete, staging, what=f"cleaning up after {where}")
        return final

    def commit(self, table: pa.Table, run_id: str, run_date: str, chunk: int, segments: bool = False) -> str:
        """Publish one part of the file table (or of the segment table) and return its final path."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        name = f"part-{run_id}-{chunk:05d}.parquet"
        base = (SEGMENTS_DIR,) if segments else ()
        return self._publish(sink.getvalue().to_pybytes(), self._path(*base, f"{PARTITION}={run_date}", name), run_id)

    def write_manifest(self, manifest: dict) -> str:
        """(Re)write `_runs/<run_id>.json` stamped `updated_at`; readers see the old or the new version, never a mix."""
        manifest["updated_at"] = now().isoformat(timespec="seconds")
        data = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
        run_id = manifest["run_id"]
        return self._publish(data, self._path(RUNS_DIR, f"{run_id}.json"), run_id)

    def discard_staging(self, run_id: str) -> None:
        """Remove what the run left in staging (nothing, after a clean finish)."""
        retrying(self._discard_staging, run_id, what=f"cleaning {self.uri}/{STAGING_DIR}/{run_id}")

    def staged_runs(self) -> list[str]:
        """Ids of the runs that have something under `_staging/`."""
        selector = pafs.FileSelector(self._path(STAGING_DIR), allow_not_found=True)
        infos = retrying(self.fs.get_file_info, selector, what=f"listing {self.uri}/{STAGING_DIR}")
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    def _discard_staging(self, run_id: str) -> None:
        folder = self._path(STAGING_DIR, run_id)
        if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
            self.fs.delete_dir(folder)

    def dataset(self, schema: pa.Schema = SCHEMA, segments: bool = False) -> pads.Dataset | None:
        """The committed parts as a pyarrow dataset (None when there are none yet)."""
        return retrying(self._dataset, schema, segments, what=f"listing {self.uri}")

    def _dataset(self, schema: pa.Schema, segments: bool) -> pads.Dataset | None:
        root = self._path(SEGMENTS_DIR) if segments else self.root
        if self.fs.get_file_info(root).type != pafs.FileType.Directory:
            return None
        partitioning = pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
        data = pads.dataset(root, filesystem=self.fs, format="parquet", partitioning=partitioning,
                            schema=schema.append(pa.field(PARTITION, pa.string())))
        return data if data.files else None

    def committed_keys(self, model_sha256: str, temperature: float, feature_hash: str,
                       ok_only: bool = False) -> set[tuple]:
        """(path, size_bytes, mtime) of the rows committed with this model, temperature and feature stage.

        A recalibrated bundle (`ser calibrate`: same weights, another temperature) gives other probabilities, so
        its files are labeled again. Rows of inputs that storage failures kept from being read do not count:
        those are tried again.
        """
        data = self.dataset()
        if data is None:
            return set()
        same = (pads.field("model_sha256") == model_sha256) & (pads.field("feature_config_hash") == feature_hash)
        same &= pads.field("temperature") == temperature
        error = pads.field("status") == "error"
        same &= ~(error & pc.match_substring(pads.field("error"), GAVE_UP))
        if ok_only:
            same &= ~error
        table = retrying(data.to_table, columns=list(SKIP_KEY), filter=same, what=f"reading {self.uri}")
        return set(zip(*(table.column(c).to_pylist() for c in SKIP_KEY), strict=True))

    def committed_parts(self, run_id: str, segments: bool = False) -> list[str]:
        """The parts a run committed to the file table (or to the segment table)."""
        data = self.dataset(SEGMENT_SCHEMA if segments else SCHEMA, segments)
        prefix = f"part-{run_id}-"
        return sorted(f for f in (data.files if data else []) if posixpath.basename(f).startswith(prefix))

    def statuses(self, parts: list[str]) -> list[str]:
        """The `status` of every row in these parts of the file table."""
        if not parts:
            return []

        def read() -> pa.Table:
            return pads.dataset(parts, filesystem=self.fs, format="parquet", schema=SCHEMA).to_table(columns=["status"])

        return retrying(read, what=f"reading {self.uri}").column("status").to_pylist()

    def manifests(self) -> list[dict]:
        """All run manifests, oldest first."""
        return retrying(self._manifests, what=f"reading {self.uri}/{RUNS_DIR}")

    def _manifests(self) -> list[dict]:
        selector = pafs.FileSelector(self._path(RUNS_DIR), allow_not_found=True)
        found = sorted(i.path for i in self.fs.get_file_info(selector) if i.path.endswith(".json"))
        manifests = []
        for path in found:
            with self.fs.open_input_stream(path) as handle:
                manifests.append(json.loads(handle.readall()))
        return manifests


def key_of(row: dict) -> tuple:
    """The skip-index key of a listing row, comparable with `Store.committed_keys`."""
    return tuple(row[c] for c in SKIP_KEY)


def latest(frame):
    """One row per path: the one from the latest run (rows are appended when a file is relabeled)."""
    return frame.sort_values(["processed_at", "run_id"]).drop_duplicates("path", keep="last")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def utc_from_ns(ns: int) -> dt.datetime:
    """Nanoseconds since the epoch -> UTC datetime at the schema's microsecond resolution."""
    return EPOCH + dt.timedelta(microseconds=ns // 1000)


def results(out: Store, low_confidence: float = 0.5) -> dict:
    """What `ser results` shows: the runs, and over the latest row per file: status, labels, low confidence."""
    data = out.dataset()
    columns = ["path", "status", "label", "confidence", "run_id", "processed_at"]
    frame = (data.to_table(columns=columns) if data else SCHEMA.empty_table().select(columns)).to_pandas()
    files = latest(frame)
    ok = files[files["status"] == "ok"]
    runs = [
        {"run_id": m["run_id"], "status": m["status"], "started_at": m["started_at"], **m["counts"],
         "wall_seconds": m.get("wall_seconds")}
        for m in out.manifests()
    ]
    return {
        "output": out.uri,
        "rows": len(frame),
        "files": len(files),
        "ok": len(ok),
        "error": int((files["status"] == "error").sum()),
        "labels": {k: int(v) for k, v in ok["label"].value_counts().items()},
        "low_confidence_threshold": low_confidence,
        "low_confidence_share": float((ok["confidence"] < low_confidence).mean()) if len(ok) else None,
        "runs": runs,
    }


def results_text(summary: dict) -> str:
    """`results` as a short plain-text report."""
    lines = [
        f"{summary['output']}: {summary['files']} files ({summary['rows']} rows) from {len(summary['runs'])} runs",
        f"ok {summary['ok']}   errors {summary['error']}",
    ]
    for name, n in summary["labels"].items():
        lines.append(f"  {name:<12}{n:>8}   {n / summary['ok']:6.1%}")
    if summary["low_confidence_share"] is not None:
        lines.append(f"low confidence (< {summary['low_confidence_threshold']:.2f}): "
                     f"{summary['low_confidence_share']:.1%} of ok files")
    lines += ["", f"{'run':<26}{'status':<11}{'listed':>8}{'skipped':>9}{'ok':>8}{'errors':>8}{'wall s':>9}"]
    for r in summary["runs"]:
        wall = f"{r['wall_seconds']:.1f}" if r["wall_seconds"] is not None else "-"
        lines.append(f"{r['run_id']:<26}{r['status']:<11}{r['listed']:>8}{r['skipped']:>9}{r['ok']:>8}"
                     f"{r['error']:>8}{wall:>9}")
    return "\n".join(lines)
