"""Every ```python block of docs/QUERYING.md runs, in order, against a labeling output, and finds something."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "QUERYING.md"
# What the examples compute, and must not come back empty on the fixture (2 runs, changes, errors).
RESULTS = ("rows", "latest", "labels", "changes", "changed", "queue", "joined", "by_speaker", "by_reason", "low",
           "per_label", "runs")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture
def namespace(results_dir, tmp_path, monkeypatch) -> dict:
    """OUT bound to the fixture output, run from a folder holding the user's metadata.csv."""
    paths = pd.read_parquet(results_dir, columns=["path"])["path"].unique()
    metadata = pd.DataFrame({"path": paths, "speaker": [f"s{i % 3}" for i in range(len(paths))], "channel": "phone"})
    metadata.to_csv(tmp_path / "metadata.csv", index=False)
    monkeypatch.chdir(tmp_path)
    return {"OUT": str(results_dir)}


def test_every_python_block_runs_and_finds_results(namespace, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
    for name in RESULTS:
        assert len(namespace[name]) > 0, name
    assert len(namespace["latest"]) == namespace["latest"]["path"].nunique() == 22
    assert set(namespace["by_reason"]["files"]) == {1}
    assert (namespace["queue"]["confidence"] < 0.5).all() and (namespace["queue"]["margin"] >= 0).all()
    assert pd.read_csv("review_queue.csv").shape[0] == len(namespace["queue"])
    assert list(namespace["runs"]["ok"]) == [14, 12]
    assert capsys.readouterr().out
