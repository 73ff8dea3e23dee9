"""A `ser label` driver SIGKILLed during listing, mid-pipeline and during its final commit.

After every kill the committed dataset holds only whole rows, no file twice; the next run finishes the job
and marks the killed run's manifest `interrupted` with what it had really committed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import boto3
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from conftest import ROOT, write_audio

from e2e.conftest import BUCKET, SER, read_output, ser
from e2e.faults import Request, kill_tree
from ser import pipeline, store

N_FILES = 24
N_S3_FILES = 6
WAIT_S = 300


def test_killed_run_leaves_whole_rows_and_rerun_finishes(tmp_path, tiny_bundle):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(N_FILES):
        write_audio(folder / f"clip{i:02d}.wav", 1.0, seed=i)
    args = ["label", str(folder), "--output", str(out), "--model", str(tiny_bundle), "--no-progress",
            "--set", "commit_every=2", "--set", "decode.batch_size=2", "--set", "inference.batch_size=2"]

    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([SER, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not list(out.glob("run_date=*/part-*.parquet")) and driver.poll() is None:
                assert time.monotonic() < deadline, "no part committed within 300 s"
                time.sleep(0.05)
        finally:
            kill_tree(driver)
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
    summaries = {m["run_id"]: m for m in (json.loads(p.read_text()) for p in (out / "_runs").glob("*.json"))}
    finished = next(m for m in summaries.values() if m["status"] == "completed")
    assert finished["counts"]["skipped"] == len(killed)
    assert finished["counts"]["ok"] == N_FILES - len(killed)
    assert finished["recovered"] == [manifest["run_id"]]
    interrupted = summaries[manifest["run_id"]]
    assert interrupted["status"] == "interrupted" and interrupted["interrupted"]["found_by"] == finished["run_id"]
    assert interrupted["counts"]["ok"] == len(killed)
    assert sorted(interrupted["parts"]) == sorted(str(p) for p in out.glob(f"run_date=*/part-{manifest['run_id']}-*"))
    assert not list((out / store.STAGING_DIR).glob("*/*"))  # the killed run's unfinished part is gone
    assert len(pd.read_parquet(out)) == N_FILES


def _killed_at(args: list[str], server, match, log) -> None:
    """Start `ser label`, SIGKILL it while S3 holds its first request that `match`es, then let the request go.

    The held request is answered 503 after the kill and never reaches the store: the driver died just before it.
    """
    hold = server.hold(match)
    driver = subprocess.Popen([SER, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        reached = hold.reached.wait(WAIT_S)
    finally:
        kill_tree(driver)
        hold.release()
    assert reached and driver.returncode == -signal.SIGKILL, f"never reached {match.__name__}"


def test_driver_killed_while_listing_and_while_committing(tmp_path, tiny_bundle, faulty_s3):
    client = boto3.client("s3", endpoint_url=faulty_s3.url)
    for i in range(N_S3_FILES):
        client.upload_file(str(write_audio(tmp_path / f"clip{i}.wav", 1.0, seed=i)), BUCKET, f"calls/clip{i}.wav")
    paths = sorted(f"s3://{BUCKET}/calls/clip{i}.wav" for i in range(N_S3_FILES))
    out = f"s3://{BUCKET}/labels"
    args = ["label", f"s3://{BUCKET}/calls", "--output", out, "--model", str(tiny_bundle), "--no-progress",
            "--set", f"commit_every={N_S3_FILES + 1}"]  # one commit, at the end
    fs = pafs.S3FileSystem(endpoint_override=faulty_s3.url, region="us-east-1")

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    def manifests() -> dict[str, dict]:
        return {m["run_id"]: m for m in (json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())
                                         for k in keys("labels/_runs/"))}

    def published() -> pd.DataFrame:
        frame = pq.read_table(f"{BUCKET}/labels", filesystem=fs).to_pandas() if keys("labels/run_date=") else None
        assert frame is None or not frame["path"].duplicated().any()
        return frame

    def listing(request: Request) -> bool:
        return request.method == "GET" and "list-type=2" in request.query and "prefix=calls" in request.query

    def part_copy(request: Request) -> bool:
        return request.copy and "/run_date=" in request.path

    def manifest_copy_after_part(request: Request) -> bool:
        return request.copy and "/_runs/" in request.path and any(map(part_copy, faulty_s3.requests))

    with open(tmp_path / "drivers.log", "w") as log:
        _killed_at(args, faulty_s3, listing, log)
        assert keys("labels/") == []  # killed before it wrote anything

        _killed_at(args, faulty_s3, part_copy, log)  # all files labeled, the only part not yet published
        assert published() is None
        (first,) = manifests().values()
        assert first["status"] == "running" and keys(f"labels/_staging/{first['run_id']}/")

        _killed_at(args, faulty_s3, manifest_copy_after_part, log)  # published, manifest not yet updated
        assert sorted(published()["path"]) == paths
        second = next(m for m in manifests().values() if m["run_id"] != first["run_id"])
        assert second["status"] == "running" and second["counts"]["ok"] == 0
        assert second["recovered"] == [first["run_id"]]  # it found the first run dead and said so

    last = ser(*args)
    assert last.returncode == 0, last.stderr
    final = published()
    assert sorted(final["path"]) == paths and (final["status"] == "ok").all()
    assert set(final["run_id"]) == {second["run_id"]}
    runs = manifests()
    done = next(m for m in runs.values() if m["status"] == "completed")
    assert done["counts"]["skipped"] == N_S3_FILES and done["recovered"] == [second["run_id"]]
    assert runs[first["run_id"]]["status"] == "interrupted" and runs[first["run_id"]]["counts"]["ok"] == 0
    assert runs[first["run_id"]]["parts"] == []
    assert runs[second["run_id"]]["status"] == "interrupted"
    assert runs[second["run_id"]]["counts"]["ok"] == N_S3_FILES and len(runs[second["run_id"]]["parts"]) == 1
    assert [k for k in keys("labels/_staging/") if not k.endswith("/")] == []  # (S3 folder markers stay)
    assert runs[second["run_id"]]["interrupted"]["reason"] == pipeline.INTERRUPTED
