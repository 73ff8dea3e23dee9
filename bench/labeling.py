"""`ser label` as its users run it: the real command in a subprocess, its whole process tree sampled.

End to end = files / wall time of the command (interpreter start, listing, Ray start, model load, shutdown).
Steady state = files/s between the moments 10% and 90% of the files had reached the driver: each result row
carries `processed_at`, the time its batch arrived at the driver, so the rate is (files that arrived in that
interval) / (its length). It leaves out start-up (Ray, workers, model load) and the drain at the end.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.monitor import run_monitored

SER = str(Path(sys.executable).with_name("ser"))
STEADY_FROM, STEADY_TO = 0.1, 0.9
LABELED_CODES = (0, 1)  # `ser label` exits 1 when some files could not be labeled: still a complete run
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "RAY_DEDUP_LOGS": "0"}


def steady_state(arrivals: np.ndarray) -> dict:
    """Files/s between the arrival of the STEADY_FROM and STEADY_TO shares of the files (seconds, any origin)."""
    times = np.sort(np.asarray(arrivals, dtype=np.float64))
    n = len(times)
    begin = times[max(0, int(np.ceil(STEADY_FROM * n)) - 1)]
    end = times[max(0, int(np.ceil(STEADY_TO * n)) - 1)]
    files = int(np.count_nonzero((times > begin) & (times <= end)))
    seconds = float(end - begin)
    return {"files": files, "seconds": seconds, "files_per_s": files / seconds if seconds > 0 else float("nan")}


def label(collection: Path, output: Path, model: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Run `ser label collection --output output` once; throughput, start-up, memory and CPU of its tree."""
    import pandas as pd

    from ser import store

    command = [SER, "label", str(collection), "--output", str(output), "--model", str(model), "--no-progress"]
    for item in overrides:
        command += ["--set", item]
    began = dt.datetime.now(dt.UTC)
    code, usage = run_monitored(command, env=QUIET_ENV, stdout=subprocess.DEVNULL, ok_codes=LABELED_CODES)
    manifest = store.Store(str(output), store.s3_options()).manifests()[-1]
    counts = manifest["counts"]
    result = {
        "files": counts["listed"],
        "labeled": counts["ok"] + counts["error"],
        "errors": counts["error"],
        "exit_code": code,
        "wall_s": usage.wall_s,
        "end_to_end_files_per_s": counts["listed"] / usage.wall_s,
        "timings": manifest["timings"],
        "usage": usage.to_dict(),
    }
    if not result["labeled"]:
        return result
    rows = pd.read_parquet(output, columns=["run_id", "processed_at"], filters=[("run_id", "=", manifest["run_id"])])
    arrivals = (rows["processed_at"] - pd.Timestamp(began)).dt.total_seconds().to_numpy()
    return {**result, "first_result_s": float(arrivals.min()), "steady": steady_state(arrivals)}
