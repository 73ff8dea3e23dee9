"""Benchmarks of the labeling job (`ser label`) against the per-file loop and this machine's limit.

`python -m bench all --data ../shared/data/ravdess --model models/ravdess-actors --json out.json` runs every
measurement in one process tree and prints a table; `--quick` does the same on a handful of files.
Definitions, results and the analysis are in docs/BENCHMARKS.md.
"""
