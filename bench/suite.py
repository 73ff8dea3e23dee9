"""`python -m bench all`: every measurement on the same files, each stage a child process sampled with psutil."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import baselines, projection, report
from bench.collection import audio_files, make_collection
from bench.labeling import label
from bench.monitor import run_monitored

ROOT = Path(__file__).resolve().parent.parent
TRAIN_CACHE = "~/.cache/ser/features"  # the training job's default feature cache (full runs reuse it)


@dataclass(frozen=True)
class Plan:
    """How much of everything a run measures."""

    files: int | None = None  # the end-to-end collection (None: every file of --data)
    loop_files: int = 300  # per-file loop: files timed
    ideal_files: int = 200  # feature stage: files timed
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64, 128)  # inference batch sizes tried ...
    timing_seconds: float = baselines.MIN_TIMED_SECONDS  # ... each timed over repeated passes this long
    memory_files: tuple[int, int] = (2000, 20000)  # the two collections compared for peak memory
    train_epochs: int = 3  # per side, the first one not timed
    overrides: tuple[str, ...] = ()  # `ser label --set` items for every labeling run


FULL = Plan()
QUICK = Plan(files=8, loop_files=4, ideal_files=4, batch_sizes=(1, 4), timing_seconds=0.2, memory_files=(8, 16),
             train_epochs=2, overrides=("decode.batch_size=1", "inference.batch_size=1"))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def stage(args: list, env: dict[str, str] | None = None) -> dict:
    """`python -m bench ARGS --json FILE` in a child process: its JSON result plus the tree's usage."""
    with tempfile.TemporaryDirectory(prefix="ser-bench-stage-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "bench", *map(str, args), "--json", str(out)]
        pythonpath = {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        _, usage = run_monitored(command, env={**pythonpath, **(env or {})}, stdout=sys.stderr)
        return {**json.loads(out.read_text()), "usage": usage.to_dict()}


def clear_earlier_runs(work: Path) -> None:
    """Remove the collections and outputs an earlier run left in --work: the full run must label every file."""
    for earlier in [*work.glob("collection-*"), *work.glob("out-*")]:
        shutil.rmtree(earlier)


def labeling_runs(sources: list[Path], plan: Plan, work: Path, model: str) -> dict:
    """The full run, the unchanged re-run, and the memory runs (the full run counts where sizes agree)."""
    n = plan.files or len(sources)
    clear_earlier_runs(work)
    for source in sources:
        source.read_bytes()  # every run, and every baseline, reads from the page cache
    collection = make_collection(sources, n, work / f"collection-{n}")
    log(f"ser label on {n} files")
    full = label(collection, work / f"out-{n}", model, plan.overrides)
    log(f"  {full['steady']['files_per_s']:.2f} files/s steady; re-run of the unchanged collection")
    rerun = label(collection, work / f"out-{n}", model, plan.overrides)
    log("ser label, split layout (decode tasks feeding one scoring actor, as on GPU clusters)")
    split = label(collection, work / f"out-{n}-split", model, (*plan.overrides, "fused=false"))
    memory = {}
    for size in plan.memory_files:
        if size == n:
            memory[str(size)] = full
            continue
        log(f"ser label on {size} files (memory)")
        folder = make_collection(sources, size, work / f"collection-{size}")
        memory[str(size)] = label(folder, work / f"out-{size}", model, plan.overrides)
    return {"collection": str(collection), "label": full, "rerun": rerun, "label_split": split, "memory": memory}


def run_all(data: str, model: str, plan: Plan, work: Path, cache_dir: str, quick: bool) -> dict:
    """Every stage, in order, on one machine; returns the results with ratios and goals."""
    results = {"machine": report.machine(), "command": " ".join(sys.argv), "plan": asdict(plan)}
    sources = audio_files(data)
    runs = labeling_runs(sources, plan, work, model)
    collection = runs.pop("collection")
    log(f"per-file loop on {plan.loop_files} files")
    results["loop"] = stage(["loop", "--data", collection, "--model", model, "--files", plan.loop_files])
    log(f"ideal: t_feat and t_infer on one core, batch sizes {plan.batch_sizes}")
    sizes = [str(s) for s in plan.batch_sizes]
    results["ideal"] = stage(["ideal", "--data", collection, "--model", model, "--files", plan.ideal_files,
                              "--batch-sizes", *sizes, "--seconds", plan.timing_seconds], env=baselines.ONE_THREAD_ENV)
    results |= runs
    train_args = ["--data", data, "--work", work, "--epochs", plan.train_epochs, "--cache-dir", cache_dir]
    train_args += ["--quick"] if quick else []
    log(f"training: Ray Train (1 worker) and a plain process, {plan.train_epochs} epochs each")
    results["train"] = {"ray": stage(["train-ray", *train_args]), "plain": stage(["train-plain", *train_args])}
    results["ratios"] = report.ratios(results)
    results["goals"] = report.goals(results["ratios"])
    results["projection"] = [projection.project(results, n) for n in projection.COLLECTIONS]
    return results


def main(args) -> dict:
    """`bench all`: run, print the table, write the JSON; the work folder is removed unless --work was given."""
    plan = QUICK if args.quick else FULL
    plan = replace(plan, overrides=plan.overrides + tuple(args.overrides))
    if args.files:
        plan = replace(plan, files=args.files)
    if args.memory_files:
        plan = replace(plan, memory_files=tuple(args.memory_files))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ser-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cache_dir = args.cache_dir or (str(work / "features") if args.quick else TRAIN_CACHE)
        results = run_all(args.data, args.model, plan, work, cache_dir, args.quick)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report.table(results))
    print("\nOn paper, on a Ray cluster (assumptions in bench/projection.py):")
    print(projection.table(results))
    return results
