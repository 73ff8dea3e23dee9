"""Shared pieces of the labeling-job tests: a mixed collection, the `ser` CLI in a subprocess, an S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import ROOT, write_audio

SER = str(Path(sys.executable).with_name("ser"))
SECRET = "s3cr3t-DO-NOT-LEAK-4f9a"  # the dummy secret key: must never show up in logs, manifests or Parquet
ACCESS_KEY = "AKIANOLEAK7Q3ZX5"  # the dummy access key id: kept out of everything the same way
BUCKET = "ser-test"


def write_mixed_collection(root: Path) -> dict[str, str]:
    """Clips of every kind the job must handle -> {file name: expected status}."""
    write_audio(root / "short.wav", 1.2, seed=1)
    write_audio(root / "long.wav", 10.0, seed=2)
    write_audio(root / "stereo48k.wav", 4.0, sample_rate=48000, channels=2, seed=3)
    write_audio(root / "deep" / "speech.flac", 3.0, sample_rate=16000, seed=4)
    write_audio(root / "deep" / "speech.ogg", 2.5, sample_rate=44100, seed=5)
    write_audio(root / "speech.mp3", 3.5, sample_rate=44100, seed=6, format="MP3")
    (root / "empty.wav").write_bytes(b"")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 8)
    (root / "notes.txt").write_text("not audio\n")
    sf.write(root / "silent.wav", np.zeros(22050, np.float32), 22050)
    ok = ("short.wav", "long.wav", "stereo48k.wav", "deep/speech.flac", "deep/speech.ogg", "speech.mp3")
    errors = ("empty.wav", "corrupt.wav", "notes.txt", "silent.wav")
    return {**dict.fromkeys(ok, "ok"), **dict.fromkeys(errors, "error")}


def ser(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `ser` command line from the repository root."""
    return subprocess.run([SER, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def read_output(out: Path) -> pd.DataFrame:
    """The committed dataset as a user reads it, one row per path (asserting there are no duplicates)."""
    frame = pd.read_parquet(out)
    assert not frame["path"].duplicated().any(), frame["path"][frame["path"].duplicated()].tolist()
    return frame.set_index("path", drop=False)


def http_answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (an error status counts: e.g. 401 when Ray's token authentication
    is on)."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_env(url: str) -> dict[str, str]:
    """What an S3 client needs to reach the test server at `url`, credentials in the environment."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url}


def _serve_s3(monkeypatch, url: str) -> dict[str, str]:
    env = s3_env(url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    return env


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 API (moto) on 127.0.0.1 with a bucket `ser-test`; yields the env a client needs."""
    from moto.backends import get_backend
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield _serve_s3(monkeypatch, f"http://127.0.0.1:{port}")
    server.stop()
    get_backend("s3").reset()  # moto keeps buckets in this process: the next test starts empty


@pytest.fixture
def faulty_s3(monkeypatch):
    """Like `s3_server`, but the server can be stopped, restarted and made to hold requests (e2e/faults.py)."""
    from moto.backends import get_backend

    from e2e.faults import FaultyS3

    server = FaultyS3(free_port())
    server.start()
    server.env = _serve_s3(monkeypatch, server.url)
    yield server
    server.close()
    get_backend("s3").reset()  # moto keeps buckets in this process: the next test starts empty
