"""S3 credentials, passed by environment or by the AWS credentials file, never show up in anything a run writes.

Runs against moto with distinctive dummy credentials, then searches the output (manifests and the decoded
Parquet rows), stdout and stderr of good and failing runs, and every file of each run's own Ray session folder.
A positive control then plants the secrets in each kind of place and checks that the same search finds them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_audio

from e2e.conftest import ACCESS_KEY, BUCKET, SECRET, ser

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRETS = (SECRET.encode(), ACCESS_KEY.encode())


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of its own (short: Ray's socket paths must fit 107 bytes), so only our logs are searched."""
    folder = tempfile.mkdtemp(prefix="sk", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _leaks(data: bytes) -> list[bytes]:
    return [s for s in SECRETS if s in data]


def _written(client, s3_url: str) -> dict[str, bytes]:
    """Every object under labels/, Parquet parts as their decoded rows (their pages are compressed)."""
    fs = pafs.S3FileSystem(endpoint_override=s3_url, region="us-east-1")
    found = {}
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix="labels/")["Contents"]:
        key = item["Key"]
        found[key] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if key.endswith(".parquet"):
            found[key] += pq.read_table(f"{BUCKET}/{key}", filesystem=fs).to_pandas().to_csv().encode()
    return found


def _files(ray_tmp: Path) -> list[Path]:
    return [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]


def _found(written: dict[str, bytes], runs: dict, files: list[Path]) -> dict[str, list[bytes]]:
    """Where the secrets show up: S3 objects, the runs' stdout and stderr, local files."""
    leaks = {f"s3 {key}": _leaks(data) for key, data in written.items()}
    leaks |= {f"{name} {stream}": _leaks(getattr(run, stream).encode()) for name, run in runs.items()
              for stream in ("stdout", "stderr")}
    leaks |= {str(path): _leaks(path.read_bytes()) for path in files}
    return {where: found for where, found in leaks.items() if found}


def test_credentials_stay_out_of_output_logs_and_errors(tmp_path, tiny_bundle, faulty_s3, ray_tmp, monkeypatch):
    url = faulty_s3.url
    client = boto3.client("s3", endpoint_url=url)
    for i in range(2):
        client.upload_file(str(write_audio(tmp_path / f"c{i}.wav", 1.0, seed=i)), BUCKET, f"calls/c{i}.wav")
    client.put_object(Bucket=BUCKET, Key="calls/corrupt.wav", Body=b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    args = ["label", f"s3://{BUCKET}/calls", "--output", f"s3://{BUCKET}/labels", "--model", str(tiny_bundle),
            "--no-progress"]
    runs = {"environment": ser(*args, env={"RAY_TMPDIR": str(ray_tmp / "env")})}
    assert runs["environment"].returncode == 1, runs["environment"].stderr  # the corrupt file: errors printed
    assert "error: s3://ser-test/calls/corrupt.wav: " in runs["environment"].stderr

    # the same credentials from the AWS credentials file, the endpoint from the job's config file
    (tmp_path / "credentials").write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\n"
                                          f"aws_secret_access_key = {SECRET}\n")
    (tmp_path / "label.yaml").write_text(yaml.safe_dump({"s3": {"endpoint_override": url, "region": "us-east-1"}}))
    for name in (*CREDENTIALS, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client.upload_file(str(write_audio(tmp_path / "new.wav", 1.0)), BUCKET, "calls/new.wav")
    config = ["--config", str(tmp_path / "label.yaml")]
    before = len(faulty_s3.requests)
    runs["file"] = ser(*args, *config, env={"RAY_TMPDIR": str(ray_tmp / "file")})
    assert runs["file"].returncode == 0, runs["file"].stderr
    assert "new.wav" in str(faulty_s3.requests[before:])  # it read the new file ...
    assert {r.key_id for r in faulty_s3.requests} == {ACCESS_KEY}  # ... and all was signed with the key

    # failing runs: an output bucket that does not exist, and a secret offered in the job's own config
    runs["no bucket"] = ser(*args[:3], "s3://no-such-bucket/labels", *args[4:], *config)
    assert runs["no bucket"].returncode == 2 and runs["no bucket"].stderr.startswith("error: ")
    runs["secret in config"] = ser(*args, *config, "--set", f"s3.secret_access_key={SECRET}")
    assert runs["secret in config"].returncode == 2
    assert "unknown config key s3.secret_access_key" in runs["secret in config"].stderr

    written = _written(client, url)
    assert any(k.endswith(".parquet") for k in written) and any("/_runs/" in k for k in written)
    logs = _files(ray_tmp)
    assert len({p.parts[len(ray_tmp.parts)] for p in logs}) == 2 and any(p.suffix == ".log" for p in logs)
    assert not _found(written, runs, logs)

    # positive control: secrets planted in a Parquet part (gzip, no statistics: not in its raw bytes), a JSON
    # object, a log file and a run's output are each found
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": [f"calls/{SECRET}-{ACCESS_KEY}.wav"]}), sink, compression="gzip",
                   write_statistics=False)
    part = sink.getvalue().to_pybytes()
    assert not _leaks(part)
    client.put_object(Bucket=BUCKET, Key="labels/planted/part-0.parquet", Body=part)
    client.put_object(Bucket=BUCKET, Key="labels/_runs/planted.json", Body=json.dumps({"key": SECRET}).encode())
    planted_log = ray_tmp / "env" / "planted" / "logs" / "worker.log"
    planted_log.parent.mkdir(parents=True)
    planted_log.write_text(f"using {ACCESS_KEY}\n")
    planted = {"planted": SimpleNamespace(stdout=f"key {ACCESS_KEY}", stderr=f"secret {SECRET}")}
    found = _found(_written(client, url), planted, _files(ray_tmp))
    assert found == {"s3 labels/planted/part-0.parquet": list(SECRETS), "s3 labels/_runs/planted.json": [SECRETS[0]],
                     str(planted_log): [SECRETS[1]], "planted stdout": [SECRETS[1]], "planted stderr": [SECRETS[0]]}
