"""A `ser label` driver SIGKILLed mid-run leaves only whole rows, and the next run finishes the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import psutil
from conftest import ROOT, write_audio

from e2e.conftest import SER, read_output, ser
from ser import store

N_FILES = 24


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever it started (embedded Ray) that outlives it by a few seconds."""
    children = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


def test_killed_run_leaves_whole_rows_and_rerun_finishes(tmp_path, tiny_bundle):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(N_FILES):
        write_audio(folder / f"clip{i:02d}.wav", 1.0, seed=i)
    args = ["label", str(folder), "--output", str(out), "--model", str(tiny_bundle), "--no-progress",
            "--set", "commit_every=2", "--set", "inference.batch_size=2"]

    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([SER, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not list(out.glob("run_date=*/part-*.parquet")) and driver.poll() is None:
                assert time.monotonic() < deadline, "no part committed within 300 s"
                time.sleep(0.05)
        finally:
            _kill_tree(driver)
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()

    killed = read_output(out)  # every committed part is whole and readable; no path twice
    assert 0 < len(killed) < N_FILES
    assert (killed["status"] == "ok").all() and killed["label"].notna().all()
    np.testing.assert_allclose(killed[list(store.PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    (manifest_path,) = (out / "_runs").glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "running" and manifest["counts"]["ok"] == len(killed)

    rerun = ser(*args)
    assert rerun.returncode == 0, rerun.stderr
    final = read_output(out)
    assert sorted(final["path"]) == sorted(str(p) for p in folder.iterdir())
    assert final.set_index("path").loc[killed["path"], "run_id"].eq(manifest["run_id"]).all()
    summaries = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    finished = next(m for m in summaries if m["status"] == "completed")
    assert finished["counts"]["skipped"] == len(killed)
    assert finished["counts"]["ok"] == N_FILES - len(killed)
    assert len(pd.read_parquet(out)) == N_FILES
