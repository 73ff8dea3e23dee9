"""The goals of issue 6, the ratios measured against them, the machine, and the printed table."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import operator
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
PACKAGES = ("tensorflow", "keras", "ray", "numpy", "librosa", "soxr", "soundfile", "pyarrow")


@dataclass(frozen=True)
class Goal:
    """A target for one ratio: `value <op> target`."""

    key: str
    title: str
    op: str  # ">=" or "<="
    target: float

    def met(self, value: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](value, self.target)


GOALS = (
    Goal("speedup_steady", "ser label steady-state files/s / per-file loop files/s", ">=", 10.0),
    Goal("speedup_end_to_end", "ser label end to end (start-up included) / per-file loop", ">=", 8.0),
    Goal("fraction_of_ideal", "ser label steady-state files/s / ideal", ">=", 0.8),
    Goal("memory_ratio", "peak RSS of the tree, large collection / small collection", "<=", 1.3),
    Goal("rerun_ratio", "incremental re-run of an unchanged collection, wall / full run", "<=", 0.05),
    Goal("train_ratio", "Ray Train (1 worker) samples/s / plain single-process", ">=", 0.9),
)


def end_to_end_ceiling(results: dict) -> float:
    """The best end-to-end files/s any Ray job could reach here: nothing is scored before Ray has started
    (as measured in the run) and an actor has imported TensorFlow and loaded the model (the ideal stage's
    model load), then every file costs exactly the ideal, with no other overhead at all."""
    ideal, full = results["ideal"], results["label"]
    floor = full["timings"]["ray_start_seconds"] + ideal["model_load_s"]
    return full["files"] / (floor + full["files"] / ideal["files_per_s"])


def ratios(results: dict) -> dict[str, float]:
    """Every goal's ratio from the stage results of `bench all`."""
    loop, ideal, full = results["loop"]["files_per_s"], results["ideal"]["files_per_s"], results["label"]
    small, large = (results["memory"][size]["usage"] for size in sorted(results["memory"], key=int))
    return {
        "speedup_steady": full["steady"]["files_per_s"] / loop,
        "speedup_end_to_end": full["end_to_end_files_per_s"] / loop,
        "speedup_end_to_end_ceiling": end_to_end_ceiling(results) / loop,
        "fraction_of_ideal": full["steady"]["files_per_s"] / ideal,
        "memory_ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"],
        "memory_ratio_pss": large["peak_pss_bytes"] / small["peak_pss_bytes"],
        "rerun_ratio": results["rerun"]["wall_s"] / full["wall_s"],
        "train_ratio": results["train"]["ray"]["samples_per_s"] / results["train"]["plain"]["samples_per_s"],
    }


def goals(values: dict[str, float]) -> dict[str, dict]:
    return {g.key: {"value": values[g.key], "target": f"{g.op} {g.target:g}", "met": g.met(values[g.key])}
            for g in GOALS}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def machine() -> dict:
    """Where and when the figures were taken."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "gpu": None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "ser")),
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def _stage_rows(results: dict) -> list[tuple[str, str]]:
    loop, ideal, full, rerun = results["loop"], results["ideal"], results["label"], results["rerun"]
    split = results["label_split"]
    train = results["train"]
    rows = [
        ("per-file loop", f"{loop['files_per_s']:.2f} files/s over {loop['files']} files"),
        ("t_feat (1 core)", f"{ideal['t_feat_s'] * 1e3:.1f} ms/file"),
        ("t_infer (1 core)", f"{ideal['t_infer_s'] * 1e3:.1f} ms/file at batch {ideal['best_batch_size']} "
                             f"({ideal['windows_per_file']:.2f} windows/file)"),
        ("ideal", f"{ideal['files_per_s']:.2f} files/s on {ideal['cores']} cores"),
        ("ser label steady", f"{full['steady']['files_per_s']:.2f} files/s (10%-90% of {full['files']} files)"),
        ("ser label end to end", f"{full['end_to_end_files_per_s']:.2f} files/s, {full['wall_s']:.1f} s wall, "
                                 f"first result at {full['first_result_s']:.1f} s"),
        ("end-to-end ceiling", f"{end_to_end_ceiling(results):.2f} files/s: Ray start "
                               f"{full['timings']['ray_start_seconds']:.1f} s + model load "
                               f"{ideal['model_load_s']:.1f} s + {full['files']} files at the ideal"),
        ("ser label CPU", f"{full['usage']['cpu_utilisation']:.0%} of {os.cpu_count()} cores"),
        ("split layout, for contrast", f"{split['steady']['files_per_s']:.2f} files/s steady, "
                                       f"{split['end_to_end_files_per_s']:.2f} end to end (fused=false)"),
        ("re-run, unchanged", f"{rerun['wall_s']:.2f} s wall"),
    ]
    for size in sorted(results["memory"], key=int):
        usage = results["memory"][size]["usage"]
        rows.append((f"peak memory, {size} files", f"RSS {usage['peak_rss_bytes'] / GIB:.2f} GiB, "
                                                   f"PSS {usage['peak_pss_bytes'] / GIB:.2f} GiB"))
    rows += [
        ("train, Ray Train 1 worker", f"{train['ray']['samples_per_s']:.1f} samples/s"),
        ("train, plain process", f"{train['plain']['samples_per_s']:.1f} samples/s"),
    ]
    return rows


def table(results: dict) -> str:
    """The measurements, then each goal with its ratio and whether it is met."""
    width = max(len(g.title) for g in GOALS)
    lines = [f"{name:<28}{text}" for name, text in _stage_rows(results)]
    lines.append("")
    for goal in GOALS:
        outcome = results["goals"][goal.key]
        verdict = "met" if outcome["met"] else "MISSED"
        lines.append(f"{goal.title:<{width}}  {outcome['value']:8.3f}  {outcome['target']:>7}  {verdict}")
    contended = [name for name, usage in _usages(results) if usage["contended"]]
    if contended:
        lines.append(f"\nWARNING: other processes used the CPU during {', '.join(contended)}: figures not valid")
    return "\n".join(lines)


def _usages(results: dict) -> list[tuple[str, dict]]:
    """(stage, usage) for every measured process tree."""
    found = [(name, results[name]["usage"]) for name in ("loop", "ideal", "label", "rerun", "label_split")]
    found += [(f"memory {size}", run["usage"]) for size, run in results["memory"].items()]
    found += [(f"train {side}", run["usage"]) for side, run in results["train"].items()]
    return found
