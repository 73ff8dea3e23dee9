"""Benchmark collections: any number of files, made of symbolic links to a source corpus under new names.

RAVDESS stays where it is (its licence forbids copying it into the repository); a collection is a folder
of links in a temporary directory, so 20 000 "recordings" cost 20 000 links and no audio bytes.
"""

from __future__ import annotations

from pathlib import Path

from ser.ravdess import AUDIO_SUFFIXES

FILES_PER_FOLDER = 1000


def audio_files(root: str | Path) -> list[Path]:
    """The audio files below `root` (RAVDESS's .wav/.flac), sorted, links resolved."""
    found = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not found:
        raise FileNotFoundError(f"{root}: no {' or '.join(AUDIO_SUFFIXES)} files")
    return [p.resolve() for p in found]


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are not more)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def make_collection(sources: list[Path], count: int, folder: Path) -> Path:
    """A folder of `count` links to files spread over `sources` (cycling through all of them when `count` is
    larger), each under a new unique name; returns the folder."""
    sources = spread(sources, count)
    for i in range(count):
        source = sources[i % len(sources)]
        link = folder / f"{i // FILES_PER_FOLDER:03d}" / f"{i:06d}-{source.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return folder
