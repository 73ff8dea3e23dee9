"""Storage faults against a real S3 API (moto on 127.0.0.1): the server goes down mid-run, objects vanish.

An outage of a few seconds is ridden out by retries with backoff; a lasting one fails the run clearly (exit 3,
one line) without publishing anything partial, and the next run finishes the job. An input deleted between
listing and reading becomes an error row saying so.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_audio

from e2e.conftest import ACCESS_KEY, BUCKET, SECRET, SER
from ser import cli, store

N_FILES = 8
OUTAGE_S = 3.0  # well inside the ~10 s the retries wait in all
SDK_RETRIES_S = 3.0  # the S3 client's own retries (3 tries, random backoff) end within this
WAIT_S = 300
RETRIED = "transient storage error"  # what each retry logs


def _collection(tmp_path, server) -> tuple[boto3.client, list[str]]:
    client = boto3.client("s3", endpoint_url=server.url)
    for i in range(N_FILES):
        client.upload_file(str(write_audio(tmp_path / f"clip{i}.wav", 1.0, seed=i)), BUCKET, f"calls/clip{i}.wav")
    return client, sorted(f"s3://{BUCKET}/calls/clip{i}.wav" for i in range(N_FILES))


def _args(tiny_bundle) -> list[str]:
    return ["label", f"s3://{BUCKET}/calls", "--output", f"s3://{BUCKET}/labels", "--model", str(tiny_bundle),
            "--no-progress", "--set", "commit_every=2", "--set", "decode.batch_size=1",
            "--set", "inference.batch_size=2"]


def _published(server):
    """The committed dataset, read as a user would; whole rows, no path twice."""
    fs = pafs.S3FileSystem(endpoint_override=server.url, region="us-east-1")
    frame = pq.read_table(f"{BUCKET}/labels", filesystem=fs).to_pandas()
    assert not frame["path"].duplicated().any()
    ok = frame[frame["status"] == "ok"]
    np.testing.assert_allclose(ok[list(store.PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    return frame.set_index("path")


def _manifests(client) -> dict[str, dict]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="labels/_runs/")["Contents"]]
    return {m["run_id"]: m for m in (json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys)}


def _down_after_first_part(server, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not any(r.copy and "/run_date=" in r.path for r in server.requests):
        assert driver.poll() is None and time.monotonic() < deadline, "no part published"
        time.sleep(0.05)
    server.stop()


def _no_secrets(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and ACCESS_KEY not in text


def test_outage_is_ridden_out_and_a_deleted_input_is_an_error_row(tmp_path, tiny_bundle, faulty_s3):
    client, paths = _collection(tmp_path, faulty_s3)
    gone = paths[-1]

    def first_manifest(request) -> bool:  # the driver has listed; no input has been read yet
        return request.method == "PUT" and "/_staging/" in request.path and request.path.endswith(".json")

    after_listing = faulty_s3.hold(first_manifest)
    driver = subprocess.Popen([SER, *_args(tiny_bundle)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert after_listing.reached.wait(WAIT_S), "never listed"
        client.delete_object(Bucket=BUCKET, Key=gone[len(f"s3://{BUCKET}/") :])
        after_listing.release()  # the held request gets a 503, which is retried
        _down_after_first_part(faulty_s3, driver)
        time.sleep(OUTAGE_S)
        faulty_s3.start()
        stdout, stderr = driver.communicate(timeout=WAIT_S)
    finally:
        driver.kill()
    assert driver.returncode == 1, stderr[-3000:]  # 1: a file failed (the deleted one)
    assert stderr.count(RETRIED) > 0, stderr[-3000:]

    frame = _published(faulty_s3)
    assert sorted(frame.index) == paths
    assert frame.loc[gone, "status"] == "error" and frame.loc[gone, "error"] == f"cannot read: {store.GONE}"
    assert (frame.drop(index=gone)["status"] == "ok").all(), frame["error"].dropna().tolist()
    (manifest,) = _manifests(client).values()
    assert manifest["status"] == "completed" and manifest["counts"] | {"listed": 0} == {
        "listed": 0, "skipped": 0, "to_label": N_FILES, "ok": N_FILES - 1, "error": 1}
    _no_secrets(stdout, stderr)


def test_lasting_outage_fails_clearly_and_publishes_nothing_partial(tmp_path, tiny_bundle, faulty_s3):
    client, paths = _collection(tmp_path, faulty_s3)
    driver = subprocess.Popen([SER, *_args(tiny_bundle)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _down_after_first_part(faulty_s3, driver)
        started = time.monotonic()
        stdout, stderr = driver.communicate(timeout=WAIT_S)
        failed_after = time.monotonic() - started
    finally:
        driver.kill()
        faulty_s3.start()
    assert driver.returncode == cli.RUN_FAILED, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "failed" in last and "gave up after" in last, last
    assert failed_after < WAIT_S / 2
    _no_secrets(stdout, stderr)

    frame = _published(faulty_s3)  # whole parts only
    assert 0 < len(frame) < N_FILES and (frame["status"] == "ok").all() and set(frame.index) < set(paths)
    # storage was gone when it failed, so its manifest still says running: the next run marks it interrupted,
    # as after a kill (test_label_kill.py), and labels the rest
    (manifest,) = _manifests(client).values()
    assert manifest["status"] == "running"
    assert stderr.count(RETRIED) >= 2 * (store.RETRY_ATTEMPTS - 1)  # the part's commit, then the failure record


def test_store_operations_retry_with_backoff_then_give_up(faulty_s3, caplog):
    out = store.Store(f"s3://{BUCKET}/labels", store.s3_options())
    manifest = {"run_id": "r1", "status": "running"}
    faulty_s3.stop()
    threading.Timer(SDK_RETRIES_S + 2, faulty_s3.start).start()  # longer than the client's retries alone
    with caplog.at_level(logging.WARNING, logger="ser.store"):
        out.write_manifest(manifest)  # rides out the outage
    assert out.manifests()[0]["run_id"] == "r1"
    retried = [r for r in caplog.records if RETRIED in r.getMessage()]
    assert 1 <= len(retried) < store.RETRY_ATTEMPTS

    caplog.clear()
    faulty_s3.stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ser.store"), pytest.raises(OSError) as failed:
        out.write_manifest(manifest)
    backoff = sum(store.RETRY_FIRST_DELAY_S * 2**i for i in range(store.RETRY_ATTEMPTS - 1))
    assert time.monotonic() - started >= backoff
    assert len([r for r in caplog.records if RETRIED in r.getMessage()]) == store.RETRY_ATTEMPTS - 1
    (line,) = str(failed.value).splitlines()
    assert line.startswith(f"uploading s3://{BUCKET}/labels/_runs/r1.json: {store.GAVE_UP} {store.RETRY_ATTEMPTS} ")


def test_rows_that_storage_kept_from_being_read_are_labeled_again(tmp_path):
    """An input that could not be read because storage failed is not 'already labeled': the next run retries it."""
    listing = [{"path": f"/in/{name}.wav", "size_bytes": 10, "mtime": store.now()} for name in ("ok", "bad", "lost")]
    errors = ["", "not a readable audio file (x)", f"cannot read: reading /in/lost.wav: {store.GAVE_UP} 5 tries"]
    result = {"row": np.arange(3), "etag": [""] * 3, "error": errors, "duration_s": [1.0] * 3,
              "sample_rate": [22050] * 3, "channels": [1] * 3, "n_windows": [1] * 3, "processing_s": [0.1] * 3,
              "probs": np.full((3, 8), 1 / 8)}
    run = {"model_name": "m", "model_sha256": "h", "temperature": 0.7, "feature_config_hash": "f", "run_id": "r",
           "processed_at": store.now()}
    out = store.Store(str(tmp_path / "out"), store.S3Options())
    out.commit(store.file_table(listing, result, run), "r", "2024-01-01", 0)
    assert out.committed_keys("h", 0.7, "f") == {store.key_of(listing[0]), store.key_of(listing[1])}
    assert out.committed_keys("h", 0.7, "f", ok_only=True) == {store.key_of(listing[0])}
