"""The labeling job on a real two-node Ray cluster: its driver joining with --address, and via `ray job submit`.

Both nodes run on this machine (`ray start` with their own ports); the manifest records which nodes decoded
and ran inference, and both must have worked. `ray job submit` needs the dashboard, i.e. `ray[default]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import ROOT, write_audio

from e2e.conftest import ACCESS_KEY, BUCKET, SECRET, free_port, http_answers, read_output

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
N_FILES = 12
START_ATTEMPTS = 3
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port")  # each node of a one-machine cluster needs its own


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block ...` for one node, on 127.0.0.1, with its own ports (two nodes share this machine)."""
    ports = [f"--{name}={free_port()}" for name in NODE_PORTS]
    command = [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
               "--object-store-memory=200000000", *ports, *args]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _stop(nodes: list[subprocess.Popen], temp: str) -> None:
    """Stop the nodes this test started (only those: `ray stop` would stop every Ray on the machine)."""
    started = [psutil.Process(n.pid) for n in nodes if n.poll() is None]
    children = [c for p in started for c in p.children(recursive=True)]
    for node in reversed(nodes):
        node.terminate()
    _, alive = psutil.wait_procs(started + children, timeout=30)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp, ignore_errors=True)


class NodeStartError(RuntimeError):
    """A node of the test cluster did not come up (Ray's start-up deadlines are tight on a loaded machine)."""


def _wait(check, what: str, nodes: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if any(n.poll() is not None for n in nodes):
            raise NodeStartError(f"a node exited while waiting for {what}")
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            if check():
                return
        if time.monotonic() > deadline:
            raise NodeStartError(f"timed out waiting for {what}")
        time.sleep(1)


def _alive_nodes(address: str, env: dict) -> list[str]:
    """Node ids of the live nodes, asked by a short-lived driver (works with or without the dashboard)."""
    script = (f"import json, ray; ray.init(address={address!r}, logging_level='error'); "
              "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
    listed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            check=True)
    return json.loads(listed.stdout.strip().splitlines()[-1])


def _has_job_api() -> bool:
    """Whether this environment can run Ray's dashboard and job server (`pip install 'ray[default]'`)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def _start_cluster(nodes: list[subprocess.Popen], env: dict, logs: Path, temp: str) -> SimpleNamespace:
    """Start a head (with the job API when available) and one worker node, appending them to `nodes`."""
    logs.mkdir()
    gcs, dashboard = free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}" if _has_job_api() else None
    head = ["--head", f"--port={gcs}", f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}"]
    if url:
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    else:
        head += ["--include-dashboard=false"]
    address = f"127.0.0.1:{gcs}"
    nodes.append(_start(head, env, logs / "head.log"))
    _wait(lambda: len(_alive_nodes(address, env)) == 1, "the head node", nodes)
    if url:
        _wait(lambda: http_answers(f"{url}/api/version"), "the dashboard", nodes)
    nodes.append(_start([f"--address={address}"], env, logs / "worker.log"))
    _wait(lambda: len(_alive_nodes(address, env)) == 2, "two nodes", nodes)
    return SimpleNamespace(address=address, url=url, env=env, node_ids=_alive_nodes(address, env), temp=temp)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head and a worker node (1 CPU each) on 127.0.0.1; tried up to START_ATTEMPTS times; always torn down."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in the job is this environment's
    env["RAY_AUTH_MODE"] = "token"  # nodes and CLI calls share the token in ~/.ray (made by the head if missing)
    # the nodes' own S3 credentials, as on a real cluster; the secrets test checks that they stay there
    env |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    # Drivers (ours and those `ray job submit` starts on the head) hand out files only once both nodes' actors
    # are up: otherwise whichever starts first labels all 12 tiny files, and the test would measure a race.
    env["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"] = "120"
    for attempt in range(START_ATTEMPTS):
        nodes: list[subprocess.Popen] = []
        temp = tempfile.mkdtemp(prefix="sr", dir="/tmp")  # Ray's session folder; short, for its socket paths
        try:
            cluster = _start_cluster(nodes, env, tmp_path / f"attempt{attempt}", temp)
        except NodeStartError:
            _stop(nodes, temp)
            continue
        try:
            yield cluster
        finally:
            _stop(nodes, temp)
        return
    pytest.fail(f"no two-node cluster after {START_ATTEMPTS} attempts; logs in {tmp_path}")


def _check_run(out: Path, node_ids: list[str]) -> None:
    """All files labeled, and both nodes did work (decode or inference)."""
    frame = read_output(out)
    assert len(frame) == N_FILES and (frame["status"] == "ok").all()
    (manifest_path,) = (out / "_runs").glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "completed" and manifest["ray"]["nodes"] == 2
    worked = set(manifest["nodes"]["decode"]) | set(manifest["nodes"]["inference"])
    assert worked == set(node_ids), manifest["nodes"]


def _job_args(tmp_path: Path, model: Path) -> list[str]:
    folder = tmp_path / "in"
    for i in range(N_FILES):
        write_audio(folder / f"clip{i:02d}.wav", 1.5, seed=i)
    return [str(folder), "--output", str(tmp_path / "out"), "--model", str(model), "--no-progress",
            "--set", "decode.batch_size=1", "--set", "inference.batch_size=2"]


@pytest.mark.slow
def test_driver_with_address_labels_on_both_nodes(tmp_path, tiny_bundle, two_node_cluster):
    command = [sys.executable, "-m", "jobs.label", *_job_args(tmp_path, tiny_bundle),
               "--address", two_node_cluster.address]
    run = subprocess.run(command, cwd=ROOT, env=two_node_cluster.env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    _check_run(tmp_path / "out", two_node_cluster.node_ids)


def test_ray_job_submit_labels_on_both_nodes(tmp_path, tiny_bundle, two_node_cluster):
    if not two_node_cluster.url:
        pytest.skip("`ray job submit` needs Ray's dashboard: pip install 'ray[default]'")
    command = [RAY, "job", "submit", "--address", two_node_cluster.url, "--working-dir", ".", "--",
               "python", "-m", "jobs.label", *_job_args(tmp_path, tiny_bundle)]
    job = subprocess.run(command, cwd=ROOT, env=two_node_cluster.env, capture_output=True, text=True, timeout=540)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout.lower()
    _check_run(tmp_path / "out", two_node_cluster.node_ids)


JOBS_SCRIPT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
ids = [client.submit_job(entrypoint=entrypoint) for entrypoint in json.loads(sys.argv[2])]
deadline = time.monotonic() + 480
while not all(client.get_job_status(i).is_terminal() for i in ids) and time.monotonic() < deadline:
    time.sleep(1)
print(json.dumps({"jobs": {i: {"status": str(client.get_job_status(i)), "info": repr(client.get_job_info(i)),
                               "logs": client.get_job_logs(i)} for i in ids},
                  "list": repr(client.list_jobs())}))
"""


def test_job_metadata_logs_and_session_keep_credentials_secret(tmp_path, tiny_bundle, two_node_cluster, faulty_s3):
    """Jobs reading S3 with the nodes' credentials: job info, job list, logs and the session folder lack them."""
    if not two_node_cluster.url:
        pytest.skip("`ray job submit` needs Ray's dashboard: pip install 'ray[default]'")
    import boto3

    client = boto3.client("s3", endpoint_url=faulty_s3.url)
    for i in range(2):
        client.upload_file(str(write_audio(tmp_path / f"c{i}.wav", 1.0, seed=i)), BUCKET, f"calls/c{i}.wav")
    job = ["python", "-m", "jobs.label", f"s3://{BUCKET}/calls", "--model", str(tiny_bundle), "--no-progress",
           "--set", f"s3.endpoint_override={faulty_s3.url}", "--output"]
    entrypoints = [" ".join([*job, f"s3://{BUCKET}/labels"]), " ".join([*job, "s3://no-such-bucket/labels"])]
    done = subprocess.run([sys.executable, "-c", JOBS_SCRIPT, two_node_cluster.url, json.dumps(entrypoints)],
                          env=two_node_cluster.env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    good, bad = report["jobs"].values()
    assert good["status"].endswith("SUCCEEDED"), good["logs"][-4000:]
    assert bad["status"].endswith("FAILED") and "no-such-bucket" in bad["info"]  # its error is in the metadata
    assert {r.key_id for r in faulty_s3.requests if "/calls/" in r.path} == {ACCESS_KEY}  # the nodes' key
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="labels/run_date=")["KeyCount"] == 1

    session = [p for p in Path(two_node_cluster.temp).rglob("*") if p.is_file() and not p.is_symlink()
               and "runtime_resources" not in p.parts]  # (the code shipped to jobs, this test's constants included)
    assert any(p.name.startswith("job-driver-") for p in session)
    places = {"job api": done.stdout.encode(), **{str(p): p.read_bytes() for p in session}}
    assert not [where for where, data in places.items() if SECRET.encode() in data or ACCESS_KEY.encode() in data]
