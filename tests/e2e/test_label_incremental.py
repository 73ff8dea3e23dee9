"""Nightly re-runs: unchanged files are skipped, touched and new files are labeled, --force relabels all."""

from __future__ import annotations

import os
import shutil

import pandas as pd
from conftest import write_audio

from ser import bundle, pipeline, store


def test_reruns_label_only_new_and_changed_files(tmp_path, tiny_bundle, local_ray):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        write_audio(folder / f"clip{i}.wav", 1.0 + i / 2, seed=i)
    (folder / "broken.wav").write_bytes(b"not audio at all")

    def label(**options) -> dict:
        cfg = pipeline.LabelConfig(input=str(folder), output=str(out), model=str(tiny_bundle), progress=False,
                                   **options)
        return pipeline.run(cfg)

    first = label()
    assert first["counts"] == {"listed": 5, "skipped": 0, "to_label": 5, "ok": 4, "error": 1}

    second = label()
    assert second["counts"] == {"listed": 5, "skipped": 5, "to_label": 0, "ok": 0, "error": 0}
    assert second["parts"] == [] and len(pd.read_parquet(out)) == 5

    touched = folder / "clip1.wav"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 5_000_000_000))
    write_audio(folder / "new.wav", 2.0, seed=9)
    third = label()
    assert third["counts"] == {"listed": 6, "skipped": 4, "to_label": 2, "ok": 2, "error": 0}
    rows = pd.read_parquet(out)
    relabeled = rows[rows["run_id"] == third["run_id"]]
    assert sorted(relabeled["path"]) == [str(folder / "clip1.wav"), str(folder / "new.wav")]
    latest = store.latest(rows)
    assert len(rows) == 7 and len(latest) == 6
    assert latest.set_index("path").loc[str(touched), "run_id"] == third["run_id"]

    retry = label(retry_errors=True)
    assert retry["counts"] == {"listed": 6, "skipped": 5, "to_label": 1, "ok": 0, "error": 1}

    forced = label(force=True)
    assert forced["counts"] == {"listed": 6, "skipped": 0, "to_label": 6, "ok": 5, "error": 1}
    assert len(store.latest(pd.read_parquet(out)).query(f"run_id == '{forced['run_id']}'")) == 6


def test_a_recalibrated_model_labels_everything_again(tmp_path, tiny_bundle, local_ray):
    """`ser calibrate` keeps the weights (the same model_sha256) but changes the temperature, so every
    probability changes: files labeled at the old temperature are not 'already labeled' at the new one."""
    folder, out, recalibrated = tmp_path / "in", tmp_path / "out", tmp_path / "recalibrated"
    for i in range(3):
        write_audio(folder / f"clip{i}.wav", 1.5, seed=i)
    shutil.copytree(tiny_bundle, recalibrated)
    card = bundle.read_card(recalibrated)
    bundle.write_card(recalibrated, card | {"calibration": card["calibration"] | {"temperature": 0.5}})

    def label(model) -> dict:
        return pipeline.run(pipeline.LabelConfig(input=str(folder), output=str(out), model=str(model), progress=False))

    first, again, other = label(tiny_bundle), label(tiny_bundle), label(recalibrated)
    assert first["model"]["sha256"] == other["model"]["sha256"]
    assert (first["model"]["temperature"], other["model"]["temperature"]) == (1.5, 0.5)
    assert again["counts"]["skipped"] == 3
    assert other["counts"] == {"listed": 3, "skipped": 0, "to_label": 3, "ok": 3, "error": 0}
    rows = pd.read_parquet(out).set_index(["run_id", "path"]).sort_index()
    assert set(rows["temperature"]) == {1.5, 0.5}
    sharper, softer = (rows.loc[run["run_id"], "confidence"] for run in (other, first))
    assert (sharper > softer).all()  # T 0.5 sharpens the same logits that T 1.5 softened
