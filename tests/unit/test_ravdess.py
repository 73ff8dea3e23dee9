"""ser.ravdess: file names, indexing, and the `seed` / `actors` protocols (on synthetic tables and the corpus)."""

from __future__ import annotations

import hashlib
import itertools
import shutil

import pandas as pd
import pytest
from conftest import write_audio, write_ravdess_like

from ser import ravdess


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "03-01-05-02-01-02-12.wav",
            {
                "modality": "audio-only",
                "vocal_channel": "speech",
                "emotion": "angry",
                "intensity": "strong",
                "statement": 1,
                "repetition": 2,
                "actor": 12,
            },
        ),
        (
            "song/Actor_24/03-02-08-01-02-01-24.flac",
            {
                "modality": "audio-only",
                "vocal_channel": "song",
                "emotion": "surprised",
                "intensity": "normal",
                "statement": 2,
                "repetition": 1,
                "actor": 24,
            },
        ),
        ("01-01-01-01-01-01-01.wav", {"modality": "audio-video", "emotion": "neutral", "actor": 1}),
    ],
)
def test_parse_name(name, expected):
    parsed = ravdess.parse_name(name)
    assert {key: parsed[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("03-01-05-02-01-12.wav", "7 two-digit fields"),
        ("03-01-05-02-01-02-12-01.wav", "7 two-digit fields"),
        ("03-01-0a-02-01-02-12.wav", "7 two-digit fields"),
        ("recording.wav", "7 two-digit fields"),
        ("03-01-09-02-01-02-12.wav", "emotion code 09"),
        ("03-01-00-02-01-02-12.wav", "emotion code 00"),
        ("03-01-05-02-01-02-25.wav", "actor"),
        ("03-01-05-02-01-03-12.wav", "repetition"),
        ("03-03-05-02-01-02-12.wav", "vocal channel code 03"),
        ("04-01-05-02-01-02-12.wav", "modality code 04"),
        ("03-01-05-03-01-02-12.wav", "intensity code 03"),
    ],
)
def test_parse_name_rejects_malformed_names(name, reason):
    with pytest.raises(ravdess.RavdessNameError, match=reason) as caught:
        ravdess.parse_name(f"some/dir/{name}")
    assert str(caught.value).startswith(f"{name}: ")


def test_index_reads_names_and_hashes_content(tmp_path):
    paths = write_ravdess_like(tmp_path / "corpus" / "Actor_x", n=3)
    twin = paths[0].with_name("03-01-01-01-01-02-01.wav")
    shutil.copy(paths[0], twin)
    (tmp_path / "corpus" / "README.txt").write_text("not audio, not indexed\n")
    table = ravdess.index(tmp_path / "corpus")
    assert table["path"].tolist() == sorted(map(str, [*paths, twin]))
    assert table.set_index("path").loc[str(paths[2]), ["emotion", "actor"]].tolist() == ["happy", 3]
    assert table["sha256"].nunique() == 3
    hashes = table.set_index("path")["sha256"]
    assert hashes[str(twin)] == hashes[str(paths[0])] == hashlib.sha256(paths[0].read_bytes()).hexdigest()


def test_index_refuses_a_foreign_file_by_name(tmp_path):
    write_ravdess_like(tmp_path, n=2)
    write_audio(tmp_path / "interview.wav")
    with pytest.raises(ravdess.RavdessNameError, match=r"^interview\.wav: "):
        ravdess.index(tmp_path)


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp], ids=["missing", "no audio"])
def test_index_needs_a_folder_with_audio(tmp_path, make):
    with pytest.raises(FileNotFoundError, match="zenodo"):
        ravdess.index(make(tmp_path))


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown protocol 'random'"):
        ravdess.split(pd.DataFrame({"actor": [1]}), "random")


# ---------------------------------------------------------------- protocols on a synthetic corpus table


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """Every actor x emotion x statement x repetition (768 rows), content hashes faked; rows 0 and 1 are identical."""
    names = [
        f"03-01-{e:02d}-01-{s:02d}-{r:02d}-{a:02d}.wav"
        for a, e, s, r in itertools.product(range(1, 25), range(1, 9), (1, 2), (1, 2))
    ]
    rows = [{"path": n, **ravdess.parse_name(n), "sha256": hashlib.sha256(n.encode()).hexdigest()} for n in names]
    rows[1]["sha256"] = rows[0]["sha256"]
    return pd.DataFrame(rows)


def test_seed_split_is_deterministic(table):
    pd.testing.assert_series_equal(ravdess.split(table, "seed"), ravdess.split(table.copy(), "seed"))


def test_seed_split_is_stratified_80_20_with_validation_from_train(table):
    sides = ravdess.split(table, "seed")
    assert set(sides) == {"train", "validation", "test"}
    unique = table.assign(side=sides).drop_duplicates("sha256")
    counts = unique["side"].value_counts()
    assert abs(counts["test"] - 0.2 * len(unique)) <= 1
    assert abs(counts["validation"] - 0.1 * 0.8 * len(unique)) <= 1  # carved out of the 80 %, never out of test
    per_emotion = pd.crosstab(unique["emotion"], unique["side"], normalize="index")
    assert per_emotion["test"].between(0.18, 0.22).all()
    assert per_emotion["validation"].between(0.06, 0.10).all()


@pytest.mark.parametrize("protocol", ravdess.PROTOCOLS)
def test_sides_share_no_recording(table, protocol):
    sides = ravdess.split(table, protocol)
    assert sides.notna().all() and sides.index.equals(table.index)
    assert (table.assign(side=sides).groupby("sha256")["side"].nunique() == 1).all()


def test_actors_protocol_holds_out_actors(table):
    actors = table.assign(side=ravdess.split(table, "actors")).groupby("side")["actor"].unique()
    assert sorted(actors["test"]) == [21, 22, 23, 24]
    assert sorted(actors["validation"]) == [17, 18, 19, 20]
    assert sorted(actors["train"]) == list(range(1, 17))


def test_actors_protocol_moves_validation_to_another_fold_never_the_test(table):
    sides = ravdess.split(table, "actors", validation_actors=(1, 2, 3, 4))
    actors = table.assign(side=sides).groupby("side")["actor"].unique()
    assert sorted(actors["validation"]) == [1, 2, 3, 4]
    assert sorted(actors["test"]) == [21, 22, 23, 24]
    assert sorted(actors["train"]) == list(range(5, 21))


@pytest.mark.parametrize("actors, message", [((20, 21), "overlaps the test actors"), ((), "expected distinct"),
                                             ((3, 3), "expected distinct"), ((0, 1), "expected distinct")])
def test_validation_actors_are_checked(table, actors, message):
    with pytest.raises(ValueError, match=message):
        ravdess.split(table, "actors", validation_actors=actors)


# ---------------------------------------------------------------- the real corpus


@pytest.fixture(scope="module")
def corpus(ravdess_dir) -> pd.DataFrame:
    return ravdess.index(ravdess_dir)


@pytest.mark.data
def test_corpus_index(corpus):
    assert len(corpus) == 2452
    assert corpus["vocal_channel"].value_counts().to_dict() == {"speech": 1440, "song": 1012}
    assert set(corpus["emotion"]) == set(ravdess.EMOTIONS)


@pytest.mark.data
def test_corpus_seed_split(corpus):
    sides = ravdess.split(corpus, "seed")
    assert abs((sides == "test").sum() - 490) <= 3
    twins = corpus["path"].str.endswith(("Actor_07/03-01-03-01-02-01-07.flac", "Actor_07/03-01-03-01-02-02-07.flac"))
    assert corpus.loc[twins, "sha256"].nunique() == 1 and twins.sum() == 2
    assert sides[twins].nunique() == 1


@pytest.mark.data
def test_corpus_actors_split(corpus):
    sides = ravdess.split(corpus, "actors")
    assert set(corpus.loc[sides == "test", "actor"]) == {21, 22, 23, 24}
    assert set(corpus.loc[sides == "validation", "actor"]) == {17, 18, 19, 20}
