"""`python -m bench all --quick` on generated clips with the tiny bundle: every figure present, finite and positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, write_ravdess_like

QUICK_SECONDS = 300  # a hang guard for the whole quick run (several Ray start-ups), not a speed goal
GENERATED_CLIPS = 24  # RAVDESS-like names: actors 1-24, so the training stages have train and validation files
REQUIRED = (
    "loop.files_per_s",
    "ideal.t_feat_s",
    "ideal.t_infer_s",
    "ideal.files_per_s",
    "ideal.windows_per_file",
    "label.steady.files_per_s",
    "label.end_to_end_files_per_s",
    "label.first_result_s",
    "label.wall_s",
    "label.timings.ray_start_seconds",
    "ideal.model_load_s",
    "ratios.speedup_end_to_end_ceiling",
    "label.usage.peak_rss_bytes",
    "label.usage.peak_pss_bytes",
    "label.usage.cpu_utilisation",
    "rerun.wall_s",
    "label_split.steady.files_per_s",
    "train.ray.samples_per_s",
    "train.plain.samples_per_s",
)
GOALS = ("speedup_steady", "speedup_end_to_end", "fraction_of_ideal", "memory_ratio", "rerun_ratio", "train_ratio")


def _lookup(results: dict, dotted: str):
    value = results
    for key in dotted.split("."):
        value = value[key]
    return value


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow  # 3-4 min of Ray start-ups (every bench stage): the default suite's longest case on 2 cores
def test_quick_bench_reports_every_figure(tmp_path, tiny_bundle):
    data, out = tmp_path / "clips", tmp_path / "bench.json"
    write_ravdess_like(data, n=GENERATED_CLIPS, seconds=2.0)
    command = [sys.executable, "-m", "bench", "all", "--quick", "--data", str(data), "--model", str(tiny_bundle),
               "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=QUICK_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())

    missing = [key for key in REQUIRED if not _finite_positive(_lookup(results, key))]
    assert not missing, {key: _lookup(results, key) for key in missing}
    assert len(results["memory"]) == 2
    for run in results["memory"].values():
        assert _finite_positive(run["usage"]["peak_rss_bytes"])
    assert set(results["goals"]) == set(GOALS)
    for key in GOALS:
        assert _finite_positive(results["ratios"][key]), (key, results["ratios"][key])
        assert isinstance(results["goals"][key]["met"], bool)
    assert results["rerun"]["labeled"] == 0  # nothing changed: the re-run skips every file
    assert "ser label steady" in done.stdout  # the printed table


def test_a_reused_work_folder_starts_from_nothing(tmp_path):
    """--work kept from an earlier run: its collections and outputs go, or the 'full' run would be a re-run."""
    for folder in ("collection-8/000", "out-8/_runs", "out-8-split", "train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "collection-8/000/000000-a.flac").symlink_to(tmp_path / "missing.flac")
    script = f"import pathlib, bench.suite; bench.suite.clear_earlier_runs(pathlib.Path({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)  # the top-level bench/
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train"]


LOOPBACK_SECONDS = 2.0
_LOOPBACK = f"""
import socket, threading, time
server = socket.create_server(("127.0.0.1", 0))
def drain():
    connection, _ = server.accept()
    while connection.recv(1 << 20):
        pass
threading.Thread(target=drain, daemon=True).start()
client, chunk, started = socket.create_connection(server.getsockname()), b"x" * (1 << 20), time.time()
while time.time() - started < {LOOPBACK_SECONDS}:
    client.sendall(chunk)
"""
_MONITOR_BOTH = f"""
import json, sys
from bench.monitor import run_monitored
_, idle = run_monitored([sys.executable, "-c", "import time; time.sleep({LOOPBACK_SECONDS})"])
_, busy = run_monitored([sys.executable, "-c", {_LOOPBACK!r}])
print(json.dumps({{"idle": idle.to_dict(), "busy": busy.to_dict()}}))
"""


def test_loopback_network_work_is_the_trees_not_another_workload():
    """Ray's processes talk over loopback, and Linux charges the softirq network processing of that traffic to
    no process: the monitor must book it as kernel work for the tree, or every labeling run looks contended."""
    done = subprocess.run([sys.executable, "-c", _MONITOR_BOTH], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=60)  # the top-level bench/
    usage = json.loads(done.stdout)
    idle, busy = usage["idle"], usage["busy"]
    assert busy["cpu_utilisation"] > 0.2  # the transfer ran
    assert busy["kernel_cpu_utilisation"] - idle["kernel_cpu_utilisation"] > 0.01, usage


BURN_SECONDS = 1.5
_BURN = f"import time\nstarted = time.process_time()\nwhile time.process_time() - started < {BURN_SECONDS}:\n    pass"
# the middle process starts a worker that burns CPU and one that outlives the root, then exits: both are orphaned
_MIDDLE = f"import subprocess, sys; [subprocess.Popen([sys.executable, '-c', code]) for code in ({_BURN!r}, " \
          "'import time; time.sleep(6)')]"
_ROOT = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {_MIDDLE!r}]); time.sleep(4)"
_MONITOR_ORPHANS = f"""
import json, subprocess, sys, psutil
from bench.monitor import TreeMonitor
root = subprocess.Popen([sys.executable, "-c", {_ROOT!r}])
with TreeMonitor(root.pid, interval=60) as monitor:  # no sample between the first and the last
    root.wait()
print(json.dumps({{"usage": monitor.usage.to_dict(), "children_left": len(psutil.Process().children())}}))
"""


def test_orphans_cpu_is_the_trees_when_it_exits_unseen():
    """Ray's processes outlive the driver that started them and work until they exit, unseen by any sample:
    re-parented to init their CPU was lost (and booked as another workload). The monitor adopts them."""
    done = subprocess.run([sys.executable, "-c", _MONITOR_ORPHANS], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=60)  # the top-level bench/
    result = json.loads(done.stdout)
    assert result["usage"]["cpu_s"] > 0.9 * BURN_SECONDS, result
    assert result["children_left"] == 0  # the orphan still sleeping when the root exited was waited for
