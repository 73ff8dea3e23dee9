"""python -m bench COMMAND: `all` runs everything; the other commands are its stages, runnable alone.

    python -m bench all --data ../shared/data/ravdess --model models/ravdess-actors --json out.json
    python -m bench all --data DIR --model DIR --quick          # a handful of files, well under a minute
    python -m bench loop|ideal --data DIR --model DIR [--files N]
    python -m bench label --data DIR --model DIR [--files N] [--set decode.batch_size=8 ...]
    python -m bench train-ray|train-plain --data RAVDESS_DIR --work DIR [--epochs N] [--quick]
    python -m bench project --results out.json                  # 1 M and 100 M recordings on a cluster, on paper
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.suite import FULL


def _files(args) -> list[Path]:
    from bench.collection import audio_files, spread

    return spread(audio_files(args.data), args.files)


def _loop(args) -> dict:
    from bench import baselines

    return baselines.per_file_loop(_files(args), args.model)


def _ideal(args) -> dict:
    import os

    from bench import baselines

    return baselines.ideal(_files(args), args.model, tuple(args.batch_sizes), os.cpu_count() or 1, args.seconds)


def _label(args) -> dict:
    from bench.collection import audio_files, make_collection
    from bench.labeling import label

    with tempfile.TemporaryDirectory(prefix="ser-bench-label-") as work:
        collection = make_collection(audio_files(args.data), args.files, Path(work) / "in")
        return label(collection, Path(work) / "out", args.model, tuple(args.overrides))


def _train(side: str):
    def run(args) -> dict:
        from bench import training

        config = training.train_config(args.data, Path(args.work), args.epochs, args.cache_dir, args.quick)
        return training.with_ray_train(config) if side == "ray" else training.plain(config)

    return run


def _all(args) -> dict:
    from bench import suite

    return suite.main(args)


def _project(args) -> None:
    from bench import projection

    print(projection.table(json.loads(Path(args.results).read_text())))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, run, help_text: str, files: int | None = None, model: bool = True):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--data", required=True, help="folder of audio files (RAVDESS: ../shared/data/ravdess)")
        if model:
            sub.add_argument("--model", required=True, help="model bundle folder")
        if files is not None:
            sub.add_argument("--files", type=int, default=files, help="files used, spread over --data")
        sub.add_argument("--json", help="write the result here as JSON")
        sub.set_defaults(run=run)
        return sub

    every = command("all", _all, "every stage, the table of goals and the JSON", files=0)
    every.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    every.add_argument("--work", help="keep collections and outputs in this folder (default: a temporary one)")
    every.add_argument("--memory-files", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    every.add_argument("--cache-dir", help="training feature cache (default: the training job's own)")
    command("loop", _loop, "the per-file loop baseline", files=FULL.loop_files)
    ideal = command("ideal", _ideal, "t_feat and t_infer on one core", files=FULL.ideal_files)
    ideal.add_argument("--batch-sizes", type=int, nargs="+", default=list(FULL.batch_sizes))
    ideal.add_argument("--seconds", type=float, default=FULL.timing_seconds, help="timing per batch size")
    label = command("label", _label, "one `ser label` run on a collection of --files links", files=2000)
    for sub in (every, label):
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="`ser label` config override, e.g. decode.batch_size=8")
    for side in ("ray", "plain"):
        train = command(f"train-{side}", _train(side), f"training samples/s ({side})", model=False)
        train.add_argument("--work", required=True)
        train.add_argument("--epochs", type=int, default=FULL.train_epochs)
        train.add_argument("--cache-dir", required=True)
        train.add_argument("--quick", action="store_true")
    project = commands.add_parser("project", help="cost and time at 1 M and 100 M recordings, from a results JSON")
    project.add_argument("--results", required=True, help="the JSON written by `python -m bench all --json`")
    project.set_defaults(run=_project, json=None)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = args.run(args)
    if result is None:
        return
    text = json.dumps(result, indent=2, default=str, allow_nan=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    elif args.command != "all":
        print(text)


if __name__ == "__main__":
    sys.exit(main())
