"""`ser label s3://... --output s3://...` against a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from e2e.conftest import SECRET, ser, write_mixed_collection
from ser import pipeline, store

BUCKET = "ser-test"


def test_s3_input_and_output_match_a_local_run(tmp_path, tiny_bundle, s3_server, local_ray):
    expected = write_mixed_collection(tmp_path / "in")
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    for name in expected:
        client.upload_file(str(tmp_path / "in" / name), BUCKET, f"calls/{name}")

    args = ("label", f"s3://{BUCKET}/calls", "--output", f"s3://{BUCKET}/labels", "--model", str(tiny_bundle))
    first = ser(*args, env=s3_server)
    assert first.returncode == 1, first.stderr  # the collection has broken files
    assert f"output: s3://{BUCKET}/labels" in first.stdout

    fs = pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"], region="us-east-1")
    remote = pq.read_table(f"{BUCKET}/labels", filesystem=fs).to_pandas().set_index("path")
    assert sorted(remote.index) == sorted(f"s3://{BUCKET}/calls/{name}" for name in expected)
    for name, status in expected.items():
        row = remote.loc[f"s3://{BUCKET}/calls/{name}"]
        assert row["status"] == status, (name, row["error"])
        etag = client.head_object(Bucket=BUCKET, Key=f"calls/{name}")["ETag"].strip('"')
        assert row["etag"] == etag

    local_cfg = pipeline.LabelConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                     model=str(tiny_bundle), progress=False)
    pipeline.run(local_cfg)
    local = pq.read_table(tmp_path / "out").to_pandas()
    local.index = [f"s3://{BUCKET}/calls/" + p[len(str(tmp_path / "in")) + 1 :] for p in local["path"]]
    columns = ["status", "label", "n_windows", "sample_rate", "channels"]
    assert remote[columns].sort_index().equals(local.loc[remote.index, columns].sort_index())
    probs = [*store.PROB_COLUMNS, "confidence", "duration_s"]
    np.testing.assert_allclose(remote[probs].to_numpy(float), local.loc[remote.index, probs].to_numpy(float),
                               atol=1e-6)

    second = ser(*args, env=s3_server)
    assert second.returncode == 0, second.stderr
    results = ser("results", f"s3://{BUCKET}/labels", "--json", env=s3_server)
    assert json.loads(results.stdout)["files"] == len(expected), results.stderr
    written = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="labels/")["Contents"]]
    files = [key for key in written if key.endswith((".json", ".parquet"))]
    assert not [key for key in files if "/_staging/" in key]
    manifests = [json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                 for key in files if key.startswith("labels/_runs/")]
    assert sorted(m["counts"]["skipped"] for m in manifests) == [0, len(expected)]
    everything = b"".join(client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in written)
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, results.stdout):
        assert SECRET not in text
    assert SECRET.encode() not in everything
