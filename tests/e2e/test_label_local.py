"""`ser label` on local Ray over a mixed collection: one row per file, valid probabilities, same as `ser predict`."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT

from e2e.conftest import read_output, ser, write_mixed_collection
from ser import config, features, pipeline, store
from ser.predict import Predictor
from ser.ravdess import EMOTIONS

DOCS = ROOT / "docs" / "LABELING.md"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_bundle, local_ray):
    """One run with segments over the mixed collection: its folder, expected statuses, output and manifest."""
    root = tmp_path_factory.mktemp("collection")
    expected = write_mixed_collection(root / "in")
    cfg = pipeline.LabelConfig(input=str(root / "in"), output=str(root / "out"), model=str(tiny_bundle),
                               segments=True, progress=False)
    return SimpleNamespace(folder=root / "in", expected=expected, out=root / "out", manifest=pipeline.run(cfg))


def test_one_row_per_file_with_the_right_status(labeled):
    frame = read_output(labeled.out)
    assert sorted(os.path.relpath(p, labeled.folder) for p in frame["path"]) == sorted(labeled.expected)
    for name, status in labeled.expected.items():
        row = frame.loc[str(labeled.folder / name)]
        assert row["status"] == status, (name, row["error"])
        if status == "error":
            assert row["error"] and "\n" not in row["error"] and pd.isna(row["label"]) and pd.isna(row["confidence"])
    assert frame.loc[str(labeled.folder / "empty.wav"), "error"] == "empty file (0 bytes)"
    assert frame.loc[str(labeled.folder / "silent.wav"), "error"].startswith("audio is silent")
    assert frame.loc[str(labeled.folder / "notes.txt"), "error"].startswith("not a readable audio file")
    assert labeled.manifest["counts"] == {"listed": 10, "skipped": 0, "to_label": 10, "ok": 6, "error": 4}
    assert labeled.manifest["status"] == "completed" and labeled.manifest["run_id"] in set(frame["run_id"])


def test_probabilities_are_valid_and_match_ser_predict(labeled, tiny_bundle):
    ok = read_output(labeled.out).query("status == 'ok'")
    probs = ok[list(store.PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (ok["label"] == [EMOTIONS[i] for i in probs.argmax(axis=1)]).all()
    np.testing.assert_allclose(ok["confidence"], probs.max(axis=1))
    predictor = Predictor(tiny_bundle)
    for path, row in ok.iterrows():
        single = predictor.predict_file(path)
        assert row["label"] == single.label, path
        assert abs(row["confidence"] - single.confidence) < 1e-6, path
        expected = [single.probabilities[c] for c in EMOTIONS]
        np.testing.assert_allclose(row[list(store.PROB_COLUMNS)].to_numpy(dtype=float), expected, atol=1e-6)
        assert row["n_windows"] == len(single.window_starts)
        assert row["duration_s"] == pytest.approx(single.info.duration_s)
        assert (row["sample_rate"], row["channels"]) == (single.info.sample_rate, single.info.channels)


def test_split_layout_writes_the_same_rows_as_the_fused_default(labeled, tiny_bundle, tmp_path):
    """Decode tasks feeding a scoring actor (the GPU layout) and fused decode+score actors (the CPU default)
    label every file and window alike."""
    cfg = pipeline.LabelConfig(input=str(labeled.folder), output=str(tmp_path / "split"), model=str(tiny_bundle),
                               segments=True, progress=False, fused=False)
    split = pipeline.run(cfg)
    assert labeled.manifest["ray"]["layout"] == {"fused": True, "min_actors": 1, "max_actors": 1,
                                                 "gpus_per_actor": 0.0}  # 1 input block: one actor
    assert split["ray"]["layout"]["fused"] is False and split["counts"] == labeled.manifest["counts"]
    columns = ["status", "error", "label", "n_windows", "duration_s", "sample_rate", "channels"]
    fused_rows, split_rows = read_output(labeled.out).sort_index(), read_output(tmp_path / "split").sort_index()
    pd.testing.assert_frame_equal(fused_rows[columns], split_rows[columns])
    np.testing.assert_allclose(fused_rows[list(store.PROB_COLUMNS)].to_numpy(dtype=float),
                               split_rows[list(store.PROB_COLUMNS)].to_numpy(dtype=float), atol=1e-6)
    fused_segments, split_segments = (
        pd.read_parquet(out / "_segments").sort_values(["path", "window"]).reset_index(drop=True)
        for out in (labeled.out, tmp_path / "split")
    )
    assert len(fused_segments) == fused_rows["n_windows"].sum() > 0
    pd.testing.assert_frame_equal(fused_segments.drop(columns=["run_id", "run_date"]),
                                  split_segments.drop(columns=["run_id", "run_date"]), atol=1e-6)


def test_file_facts_and_provenance(labeled, tiny_bundle):
    frame = read_output(labeled.out)
    long = frame.loc[str(labeled.folder / "long.wav")]
    assert long["n_windows"] == 6 and long["duration_s"] == pytest.approx(10.0)
    stereo = frame.loc[str(labeled.folder / "stereo48k.wav")]
    assert (stereo["sample_rate"], stereo["channels"]) == (48000, 2)
    stat = os.stat(labeled.folder / "long.wav")
    assert long["size_bytes"] == stat.st_size
    assert long["mtime"] == pd.Timestamp(stat.st_mtime_ns // 1000, unit="us", tz="UTC")
    assert frame["etag"].isna().all()  # local files have none
    card = json.loads((tiny_bundle / "model.json").read_text())
    assert set(frame["model_sha256"]) == {card["files"]["model.keras"]} and set(frame["model_name"]) == {"tiny-test"}
    assert set(frame["temperature"]) == {card["calibration"]["temperature"]}
    assert set(frame["feature_config_hash"]) == {features.feature_config_hash()}
    assert set(frame["run_date"].astype(str)) == {labeled.manifest["run_date"]}
    parts = list(labeled.out.glob("run_date=*/part-*.parquet"))
    assert [str(p) for p in parts] == labeled.manifest["parts"]
    assert pq.read_schema(parts[0]).remove_metadata() == store.SCHEMA.remove_metadata()
    assert not any((labeled.out / "_staging").iterdir())  # finished runs leave nothing in staging


def test_segments_one_row_per_window(labeled):
    files = read_output(labeled.out).query("status == 'ok'")
    segments = pd.read_parquet(labeled.out / "_segments")
    assert len(segments) == files["n_windows"].sum()
    assert set(segments["run_id"]) == {labeled.manifest["run_id"]}
    for path, group in segments.groupby("path"):
        assert list(group.sort_values("window")["window"]) == list(range(int(files.loc[path, "n_windows"])))
        mean = group[list(store.PROB_COLUMNS)].mean().to_numpy()
        np.testing.assert_allclose(mean, files.loc[path, list(store.PROB_COLUMNS)].to_numpy(dtype=float), atol=1e-9)
    long = segments[segments["path"] == str(labeled.folder / "long.wav")].sort_values("window")
    np.testing.assert_allclose(long["end_s"] - long["start_s"], 3.0)
    assert long["end_s"].iloc[-1] == pytest.approx(10.0)


def test_results_command_summarizes_the_dataset(labeled):
    result = ser("results", str(labeled.out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["files"], summary["ok"], summary["error"]) == (10, 6, 4)
    assert sum(summary["labels"].values()) == 6
    assert summary["runs"][0]["run_id"] == labeled.manifest["run_id"]
    text = ser("results", str(labeled.out)).stdout
    assert "ok 6   errors 4" in text and labeled.manifest["run_id"] in text and "low confidence" in text


def test_listing_globs_list_files_and_suffixes(tmp_path):
    for name in ("a.wav", "b.flac", "sub/c.wav", "sub/deeper/d.wav", ".hidden.wav", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    s3 = store.S3Options()

    def names(spec: str, **kwargs) -> list[str]:
        return [os.path.relpath(r["path"], tmp_path) for r in pipeline.list_inputs(spec, s3, **kwargs)]

    assert names(str(tmp_path)) == ["a.wav", "b.flac", "notes.txt", "sub/c.wav", "sub/deeper/d.wav"]
    assert names(str(tmp_path / "*.wav")) == ["a.wav"]
    assert names(str(tmp_path / "**/*.wav")) == ["a.wav", "sub/c.wav", "sub/deeper/d.wav"]
    assert names(str(tmp_path), suffixes=(".WAV",)) == ["a.wav", "sub/c.wav", "sub/deeper/d.wav"]
    listed = tmp_path / "inputs.lst"
    listed.write_text(f"# nightly\nsub/c.wav\n\n{tmp_path / 'b.flac'}\nmissing.wav\n")
    rows = pipeline.list_inputs(str(listed), s3)
    assert [os.path.relpath(r["path"], tmp_path) for r in rows] == ["b.flac", "missing.wav", "sub/c.wav"]
    assert rows[1]["size_bytes"] is None and rows[2]["size_bytes"] == 1
    with pytest.raises(pipeline.InputError):
        pipeline.list_inputs(str(tmp_path / "nothing-here"), s3)


def test_config_file_documents_the_defaults():
    assert config.load(pipeline.LabelConfig, config.CONFIG_DIR / "label.yaml") == pipeline.LabelConfig()
    result = ser("label", "in", "--output", "out", "--set", "inference.max_actors=3", "--segments", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = config.build(pipeline.LabelConfig, yaml.safe_load(result.stdout))
    assert (printed.input, printed.output, printed.inference.max_actors, printed.segments) == ("in", "out", 3, True)


def test_usage_errors_exit_2(tmp_path, tiny_bundle):
    cases = [
        ("label", str(tmp_path), "--model", str(tiny_bundle)),  # no --output
        ("label", str(tmp_path / "absent"), "--output", str(tmp_path / "o"), "--model", str(tiny_bundle)),
        ("label", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "no_such_key=1"),
        ("label", str(tmp_path), "--output", str(tmp_path / "o"), "--model", str(tmp_path)),  # not a bundle
        ("results", str(tmp_path / "absent")),
    ]
    for args in cases:
        result = ser(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_docs_name_every_column():
    text = DOCS.read_text()
    for name in [*store.SCHEMA.names, *store.SEGMENT_SCHEMA.names, "run_date"]:
        assert f"`{name}`" in text, name


def test_readers_ignore_staging_and_run_folders(labeled):
    before = len(pd.read_parquet(labeled.out))
    junk = labeled.out / "_staging" / "killed-run" / "part-killed-run-00000.parquet"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"PAR1 half a part")  # what a killed writer could leave behind
    try:
        assert len(pd.read_parquet(labeled.out)) == before
    finally:
        junk.unlink()
        junk.parent.rmdir()


def test_secrets_are_redacted_from_recorded_config():
    recorded = store.redact({"s3": {"endpoint_override": "http://user:pw@minio:9000/?sig=x", "secret_key": "abc"},
                             "input": "s3://bucket/calls", "token": None})
    assert recorded == {"s3": {"endpoint_override": "http://minio:9000/", "secret_key": store.REDACTED},
                        "input": "s3://bucket/calls", "token": None}
