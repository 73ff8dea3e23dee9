"""Hostile inputs through the real labeling job (local Ray, a real bundle): the job completes, every input is one
`ok` or `error` row with a specific reason, and a long recording is decoded in bounded memory.

Reading a chmod-000 file fails only for a user without root's override: as root (as in CI containers) the file
is read, and the test expects an `ok` row instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import make_speechlike, write_audio

from e2e.conftest import BUCKET, read_output
from ser import audio, features, pipeline, store

AS_ROOT = os.geteuid() == 0
SR = audio.SAMPLE_RATE
LONG = {"seconds": 120, "rate": 96000, "channels": 8}  # the default suite's long file: 184 MB of 16-bit PCM
# The slow case: 5.5 GB on disk, 11 GB as float32. Beyond 4 GiB a WAV's 32-bit sizes overflow (libsndfile then
# reads only the first 4 GiB); recorders write RF64, the 64-bit WAV, and so does the test.
HOUR = {"seconds": 3600, "rate": 96000, "channels": 8, "container": "RF64"}
WRITE_CHUNK_S = 10  # long files are written 10 s at a time, never held whole
# What a decode may add to a warmed-up process's peak RSS, beyond the mono 22.05 kHz signal (twice, while its
# blocks are joined) and the features: one batch of log-mels (~60 MB), a decode block and an RMS chunk
# (~40 MB), allocator slack. It does not grow with the length, rate or channels of the input.
DECODE_WORKING_BYTES = 128 * 2**20
UNRECOGNISED = "not a readable audio file (Format not recognised.)"  # the reason is libsndfile's own words
# Entries that are no regular file; a folder walk lists them like a list file does, each as an error row.
UNUSABLE = {
    "loop.wav": "cannot read: too many levels of symbolic links",
    "dangling.wav": "cannot read: no such file or directory",
    "pipe.wav": "not a regular file",
}

# file name -> (status, error prefix); what the job must report for each, from a folder walk
EXPECTED = {
    "empty.wav": ("error", "empty file (0 bytes)"),
    "truncated-header.wav": ("error", "not a readable audio file (Error in WAV file. No 'data' chunk marker.)"),
    "claims-more-than-present.wav": ("ok", ""),
    "random-bytes.wav": ("error", UNRECOGNISED),
    "notes.wav": ("error", UNRECOGNISED),
    "zero-samples.wav": ("error", "audio has zero samples"),
    "nan.wav": ("error", "audio contains NaN or infinite samples"),
    "inf.wav": ("error", "audio contains NaN or infinite samples"),
    "huge-values.wav": ("error", "audio samples out of range (peak 1e+20"),
    "silence.wav": ("error", "audio is silent (peak below -80 dBFS)"),
    "500hz.wav": ("error", "unsupported sample rate 500 Hz"),
    "8ch.wav": ("ok", ""),
    "8khz.wav": ("ok", ""),
    "96khz.wav": ("ok", ""),
    "pcm24.wav": ("ok", ""),
    "float64.wav": ("ok", ""),
    "speech.mp3": ("ok", ""),
    "speech.ogg": ("ok", ""),
    "speech.flac": ("ok", ""),
    "name with spaces é 日本.wav": ("ok", ""),
    "new\nline.wav": ("ok", ""),
    "x.wav/inside-a-folder-named-x.wav.wav": ("ok", ""),
    "unreadable.wav": ("ok", "") if AS_ROOT else ("error", "cannot read: permission denied"),
    "long.wav": ("ok", ""),
    **{name: ("error", reason) for name, reason in UNUSABLE.items()},
}
# Named in a list file, each is an error row: the unusable entries, a folder (which a walk goes into instead)
# and a missing file.
SPECIAL = {
    **UNUSABLE,
    "x.wav": "is a directory",
    "missing.wav": "cannot read: no such file or directory",
}


def write_long(path: Path, seconds: int, rate: int, channels: int, container: str = "WAV") -> Path:
    """Speech-like 16-bit audio streamed to disk WRITE_CHUNK_S at a time (one chunk repeated, never silent)."""
    chunk = make_speechlike(WRITE_CHUNK_S, rate, channels)
    with sf.SoundFile(path, "w", rate, channels, "PCM_16", format=container) as out:
        for _ in range(seconds // WRITE_CHUNK_S):
            out.write(chunk)
    return path


def write_hostile(folder: Path) -> None:
    """The corpus of EXPECTED and SPECIAL under `folder`."""
    folder.mkdir(parents=True)
    good = write_audio(folder / "good.tmp", 2.0, format="WAV").read_bytes()  # 44-byte header, then 2 s of 16-bit mono
    os.remove(folder / "good.tmp")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "truncated-header.wav").write_bytes(good[:30])
    (folder / "claims-more-than-present.wav").write_bytes(good[: 44 + 2 * SR])  # the header says 2 s, 1 s is there
    (folder / "random-bytes.wav").write_bytes(np.random.default_rng(0).bytes(8192))
    (folder / "notes.wav").write_text("meeting notes, not audio\n" * 40)
    sf.write(folder / "zero-samples.wav", np.zeros((0, 1), np.float32), SR)
    for name, position, value in (("nan.wav", 1000, np.nan), ("inf.wav", 5, np.inf)):
        samples = make_speechlike(2.0)
        samples[position] = value
        sf.write(folder / name, samples, SR, subtype="FLOAT")
    peak = make_speechlike(2.0)
    sf.write(folder / "huge-values.wav", peak / np.abs(peak).max() * 1e20, SR, subtype="FLOAT")
    sf.write(folder / "silence.wav", np.zeros((2 * SR, 2), np.float32), SR)
    write_audio(folder / "500hz.wav", 2.0, sample_rate=500)
    write_audio(folder / "8ch.wav", 2.0, channels=8)
    write_audio(folder / "8khz.wav", 2.0, sample_rate=8000)
    write_audio(folder / "96khz.wav", 2.0, sample_rate=96000)
    write_audio(folder / "pcm24.wav", 2.0, subtype="PCM_24")
    write_audio(folder / "float64.wav", 2.0, subtype="DOUBLE")
    write_audio(folder / "speech.mp3", 2.0, sample_rate=44100, format="MP3")
    write_audio(folder / "speech.ogg", 2.0, sample_rate=44100)
    write_audio(folder / "speech.flac", 2.0, sample_rate=44100)
    write_audio(folder / "name with spaces é 日本.wav", 2.0)
    write_audio(folder / "new\nline.wav", 2.0)
    write_audio(folder / "x.wav" / "inside-a-folder-named-x.wav.wav", 2.0)
    write_audio(folder / "unreadable.wav", 2.0).chmod(0)
    write_long(folder / "long.wav", **LONG)
    os.symlink("loop.wav", folder / "loop.wav")
    os.symlink("nowhere.wav", folder / "dangling.wav")
    os.mkfifo(folder / "pipe.wav")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_bundle, local_ray):
    """The corpus labeled twice: as a folder, and through a list file naming the special entries."""
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "in"
    write_hostile(folder)
    listed = root / "special.lst"
    listed.write_text("".join(f"{folder / name}\n" for name in [*SPECIAL, "8ch.wav"]))
    runs = {}
    for name, spec in (("walked", folder), ("listed", listed)):
        cfg = pipeline.LabelConfig(input=str(spec), output=str(root / f"out-{name}"), model=str(tiny_bundle),
                                   progress=False)
        manifest = pipeline.run(cfg)
        runs[name] = SimpleNamespace(manifest=manifest, rows=read_output(root / f"out-{name}"))
    yield SimpleNamespace(folder=folder, **runs)
    (folder / "unreadable.wav").chmod(0o644)  # so that pytest can clean up its temporary folders


def _check_row(row: pd.Series, status: str, reason: str, name: str) -> None:
    assert row["status"] == status, (name, row["error"])
    if status == "ok":
        assert pd.isna(row["error"]) and row["label"] and row["n_windows"] >= 1, name
    else:
        assert row["error"].startswith(reason), (name, row["error"])
        assert "\n" not in row["error"] and pd.isna(row["label"]) and pd.isna(row["confidence"]), name


def test_every_file_of_a_folder_is_one_row_with_a_specific_reason(hostile):
    rows, manifest = hostile.walked.rows, hostile.walked.manifest
    assert manifest["status"] == "completed"
    # every entry once: symlink loops, dangling links and FIFOs as error rows, and a folder named x.wav is
    # walked into
    assert sorted(os.path.relpath(p, hostile.folder) for p in rows["path"]) == sorted(EXPECTED)
    for name, (status, reason) in EXPECTED.items():
        _check_row(rows.loc[str(hostile.folder / name)], status, reason, name)
    n_errors = sum(status == "error" for status, _ in EXPECTED.values())
    counts = {key: manifest["counts"][key] for key in ("listed", "to_label", "ok", "error")}
    assert counts == {"listed": len(EXPECTED), "to_label": len(EXPECTED), "ok": len(EXPECTED) - n_errors,
                      "error": n_errors}


def test_odd_formats_keep_their_facts(hostile):
    rows = hostile.walked.rows
    rows = rows.set_index(rows["path"].map(lambda path: os.path.relpath(path, hostile.folder)))
    facts = rows[["sample_rate", "channels", "duration_s"]]
    assert tuple(facts.loc["8ch.wav"]) == (SR, 8, 2.0)
    assert tuple(facts.loc["8khz.wav"]) == (8000, 1, 2.0)
    assert tuple(facts.loc["96khz.wav"]) == (96000, 1, 2.0)
    assert facts.loc["claims-more-than-present.wav", "duration_s"] == 1.0  # what is there, not what was claimed
    assert facts.loc["speech.mp3", "sample_rate"] == 44100
    long = rows.loc["long.wav"]
    assert (long["sample_rate"], long["channels"], long["duration_s"]) == (96000, 8, LONG["seconds"])
    assert long["n_windows"] == len(audio.window_starts(LONG["seconds"] * SR)) == 79


def test_named_special_entries_become_error_rows(hostile):
    rows, manifest = hostile.listed.rows, hostile.listed.manifest
    assert manifest["status"] == "completed"
    assert manifest["counts"]["listed"] == len(SPECIAL) + 1 and manifest["counts"]["error"] == len(SPECIAL)
    for name, reason in SPECIAL.items():
        _check_row(rows.loc[str(hostile.folder / name)], "error", reason, name)
    _check_row(rows.loc[str(hostile.folder / "8ch.wav")], "ok", "", "8ch.wav")


def test_a_directory_link_cycle_lists_each_file_once(tmp_path):
    """A walk follows directory links into each directory once: links back up add nothing, and two links to
    one folder outside list its file once, which --root still refuses."""
    folder = tmp_path / "in"
    write_audio(folder / "a.wav", 1.0)
    write_audio(folder / "sub" / "b.wav", 1.0)
    write_audio(tmp_path / "elsewhere" / "c.wav", 1.0)
    os.symlink("..", folder / "sub" / "up")  # e.g. a `latest -> .` link
    os.symlink(".", folder / "sub" / "here")
    for name in ("x", "y"):
        os.symlink(tmp_path / "elsewhere", folder / name)
    rows = pipeline.list_inputs(str(folder), store.S3Options())
    assert [row["path"] for row in rows] == [str(folder / name) for name in ("a.wav", "sub/b.wav", "x/c.wav")]
    with pytest.raises(pipeline.InputError, match=r"1 input\(s\) outside --root .*'.*/x/c\.wav'$"):
        pipeline.list_inputs(str(folder), store.S3Options(), root=str(folder))


def test_large_remote_objects_are_spooled_to_disk(tmp_path, s3_server, monkeypatch):
    """An S3 object is read into memory up to REMOTE_IN_MEMORY_BYTES, else copied to a local file in chunks;
    the features are the same either way, and the same as from the local file."""
    import boto3

    clip = write_audio(tmp_path / "clip.flac", 4.0, sample_rate=44100, channels=2)
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).upload_file(str(clip), BUCKET, "in/clip.flac")
    uri, s3, spool = f"s3://{BUCKET}/in/clip.flac", store.s3_options(), str(tmp_path / "spool")
    in_memory, etag = pipeline.read_input(uri, s3, spool)
    assert in_memory == clip.read_bytes() and etag and not os.path.exists(spool)
    monkeypatch.setattr(pipeline, "REMOTE_IN_MEMORY_BYTES", 1000)
    monkeypatch.setattr(pipeline, "SPOOL_CHUNK_BYTES", 777)
    assert pipeline.read_input(uri, s3, spool) == (spool, etag)
    assert Path(spool).read_bytes() == clip.read_bytes()
    result = pipeline.featurize_one(uri, s3)
    assert result["error"] == "" and result["etag"] == etag
    np.testing.assert_array_equal(result["features"], features.file_features(str(clip))[0])


# ---------------------------------------------------------------- memory on long files

# The peak RSS is read from VmHWM, which starts afresh at exec: getrusage's ru_maxrss would include the RSS
# of the pytest process this one was forked from.
PROBE = """
import json, sys
from ser import pipeline, store

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

warm_up, target, mode = sys.argv[1:]
pipeline.featurize_one(warm_up, store.S3Options())  # imports, JIT compilation, FFT plans
before = peak_kib()
if mode == "job":
    result = pipeline.featurize_one(target, store.S3Options())
    facts = {"error": result["error"], "n_windows": len(result["features"])}
else:  # what decoding used to do: the whole file as float32 at once
    import soundfile as sf
    facts = {"frames": len(sf.read(target, dtype="float32", always_2d=True)[0])}
print(json.dumps({"added_bytes": (peak_kib() - before) * 1024, **facts}))
"""


def decode_peak(warm_up: Path, target: Path, mode: str = "job") -> dict:
    """Run the decode stage (`featurize_one`, as a Ray decode task does) on `target` in a fresh process; return
    how much it raised the process's peak RSS over a warmed-up baseline, with what it produced."""
    env = {**os.environ, **pipeline.DECODE_ENV}
    done = subprocess.run([sys.executable, "-c", PROBE, str(warm_up), str(target), mode], capture_output=True,
                          text=True, env=env, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_bound(seconds: int) -> int:
    """Peak RSS a decode of `seconds` of audio may add: mono at 22.05 kHz twice, its features, working memory."""
    n_windows = len(audio.window_starts(seconds * SR))
    return 2 * seconds * SR * 4 + n_windows * int(np.prod(features.FEATURE_SHAPE)) * 4 + DECODE_WORKING_BYTES


def test_long_file_decodes_in_bounded_memory(hostile, tmp_path):
    warm_up = write_long(tmp_path / "warm-up.wav", WRITE_CHUNK_S, LONG["rate"], LONG["channels"])
    streamed = decode_peak(warm_up, hostile.folder / "long.wav")
    whole = decode_peak(warm_up, hostile.folder / "long.wav", mode="whole")
    whole_bytes = LONG["seconds"] * LONG["rate"] * LONG["channels"] * 4
    print(f"\n2-min 96 kHz 8-ch file: decode stage added {streamed['added_bytes'] / 2**20:.0f} MiB to peak RSS; "
          f"a whole-file float32 read added {whole['added_bytes'] / 2**20:.0f} MiB")
    assert streamed["error"] == "" and streamed["n_windows"] == 79
    assert whole["frames"] == LONG["seconds"] * LONG["rate"] and whole["added_bytes"] >= 0.9 * whole_bytes
    assert streamed["added_bytes"] < memory_bound(LONG["seconds"]) < whole_bytes


@pytest.mark.slow
def test_one_hour_file_labels_in_bounded_memory(tmp_path, tiny_bundle, local_ray):
    folder = tmp_path / "in"
    folder.mkdir()
    hour = write_long(folder / "hour.wav", **HOUR)
    warm_up = write_long(tmp_path / "warm-up.wav", WRITE_CHUNK_S, HOUR["rate"], HOUR["channels"], "RF64")
    try:
        streamed = decode_peak(warm_up, hour)
        print(f"\n1-hour 96 kHz 8-ch file ({hour.stat().st_size / 2**30:.1f} GiB): decode stage added "
              f"{streamed['added_bytes'] / 2**20:.0f} MiB to peak RSS")
        n_windows = len(audio.window_starts(HOUR["seconds"] * SR))
        assert streamed["error"] == "" and streamed["n_windows"] == n_windows == 2399
        assert streamed["added_bytes"] < memory_bound(HOUR["seconds"])
        assert memory_bound(HOUR["seconds"]) < HOUR["seconds"] * HOUR["rate"] * HOUR["channels"] * 4 / 8
        cfg = pipeline.LabelConfig(input=str(folder), output=str(tmp_path / "out"), model=str(tiny_bundle),
                                   progress=False)
        manifest = pipeline.run(cfg)
        row = read_output(tmp_path / "out").loc[str(hour)]
        assert manifest["counts"]["ok"] == 1 and row["status"] == "ok" and row["n_windows"] == 2399
        assert row["duration_s"] == HOUR["seconds"] and (row["sample_rate"], row["channels"]) == (96000, 8)
    finally:
        hour.unlink()  # 5.5 GB: do not leave it to pytest's retention of old temporary folders
