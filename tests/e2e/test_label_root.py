"""`ser label LIST --root DIR`: inputs must stay inside DIR, or the run is refused before it starts."""

from __future__ import annotations

import os

import boto3
import pytest
from conftest import write_audio

from e2e.conftest import BUCKET, ser
from ser import pipeline, store


@pytest.fixture
def tree(tmp_path):
    """DIR with clips, a symlink inside it leading out, one leading to a clip inside, and a clip outside."""
    root = tmp_path / "root"
    for name in ("a.wav", "sub/b.wav"):
        write_audio(root / name, 0.5)
    write_audio(tmp_path / "outside" / "x.wav", 0.5)
    os.symlink(tmp_path / "outside" / "x.wav", root / "out-link.wav")
    os.symlink(root / "sub" / "b.wav", root / "in-link.wav")
    return root


def test_escaping_lines_refuse_the_run_and_name_the_lines(tmp_path, tree, tiny_bundle):
    listing = tmp_path / "todo.txt"
    outside = tmp_path / "outside" / "x.wav"
    listing.write_text(f"a.wav\n../outside/x.wav\n# a comment\n\n{outside}\nsub/b.wav\nout-link.wav\n"
                       "sub/../../outside/x.wav\n")
    out = tmp_path / "out"
    run = ser("label", str(listing), "--root", str(tree), "--output", str(out), "--model", str(tiny_bundle))
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line == (f"error: {listing}: 4 input(s) outside --root {tree}: line 2 '../outside/x.wav', "
                    f"line 5 '{outside}', line 7 'out-link.wav', line 8 'sub/../../outside/x.wav'")
    assert not out.exists()  # refused before anything was written


def test_relative_lines_resolve_against_root_and_links_inside_are_fine(tmp_path, tree):
    listing = tmp_path / "elsewhere" / "todo.txt"
    listing.parent.mkdir()
    listing.write_text(f"a.wav\nsub/b.wav\nin-link.wav\n{tree / 'sub' / 'b.wav'}\n")
    rows = pipeline.list_inputs(str(listing), store.S3Options(), root=str(tree))
    assert [r["path"] for r in rows] == [str(tree / n) for n in ("a.wav", "in-link.wav", "sub/b.wav")]
    assert all(r["size_bytes"] for r in rows)
    without = pipeline.list_inputs(str(listing), store.S3Options())  # relative to the list's folder then
    assert [r["path"] for r in without][:2] == [str(listing.parent / "a.wav"), str(listing.parent / "in-link.wav")]


def test_folder_input_with_a_link_leading_out_is_refused(tree):
    with pytest.raises(pipeline.InputError, match=r"1 input\(s\) outside --root .*'.*out-link\.wav'"):
        pipeline.list_inputs(str(tree), store.S3Options(), root=str(tree))
    with pytest.raises(pipeline.InputError, match="no such folder"):
        pipeline.list_inputs(str(tree), store.S3Options(), root=str(tree / "missing"))


def test_s3_root_keeps_list_entries_under_its_prefix(tmp_path, s3_server):
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    for key in ("calls/a.wav", "private/x.wav"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"RIFF")
    listing = tmp_path / "todo.txt"
    listing.write_text(f"a.wav\n../private/x.wav\ns3://{BUCKET}/private/x.wav\n")
    s3 = store.s3_options()
    with pytest.raises(pipeline.InputError, match=r"2 input\(s\) outside --root s3://ser-test/calls: line 2 .*line 3"):
        pipeline.list_inputs(str(listing), s3, root=f"s3://{BUCKET}/calls")
    listing.write_text("a.wav\n")
    assert [r["path"] for r in pipeline.list_inputs(str(listing), s3, root=f"s3://{BUCKET}/calls")] == [
        f"s3://{BUCKET}/calls/a.wav"]
