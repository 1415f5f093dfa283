"""Reading and writing OUT/manifest.json, the description of a shard folder written by tools/make_shards.py.

Readers (pipelines/, the trainer) use load_manifest and shard_files; the keys are listed in docs/data.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "num_samples", "labelled", "classes", "shards", "skipped", "options", "source")
REQUIRED_SHARD_KEYS = ("file", "index_file", "samples", "bytes", "first_idx")
# Optional key (folders made before it lack it): the file, beside the manifest, whose line i is sample i's source
# name (its path relative to the input folder, or the list file's entry); data.subset matches image names in it.
SAMPLE_NAMES_KEY = "sample_names"
SAMPLE_NAMES_FILE = "sample_names.txt"


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    path = Path(shard_dir)
    return path if path.name == MANIFEST_NAME else path / MANIFEST_NAME


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a shard folder (or the manifest.json path itself); errors name the file and the problem."""
    path = manifest_path(shard_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no shard manifest (make the shards with tools/make_shards.py; "
            "a folder without manifest.json is an unfinished run)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: corrupt manifest: top level is {type(manifest).__name__}, expected an object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format_version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    for i, shard in enumerate(manifest["shards"]):
        missing = [k for k in REQUIRED_SHARD_KEYS if k not in shard]
        if missing:
            raise ValueError(f"{path}: shards[{i}] lacks keys {missing}")
    return manifest


def shard_files(shard_dir: str | os.PathLike, manifest: dict) -> list[tuple[Path, Path]]:
    """(tar path, DALI index path) of every shard, in idx order."""
    folder = manifest_path(shard_dir).parent
    return [(folder / s["file"], folder / s["index_file"]) for s in manifest["shards"]]


def sample_names_file(shard_dir: str | os.PathLike, manifest: dict) -> Path | None:
    """The sample-names file a manifest lists, or None for a folder made without one."""
    name = manifest.get(SAMPLE_NAMES_KEY)
    return None if name is None else manifest_path(shard_dir).parent / name


def encode_sample_name(name: str) -> str:
    """One line of the sample-names file: a newline or carriage return inside a name would shift every later
    line off its sample, so they are written as the two characters \\n and \\r."""
    return name.replace("\n", "\\n").replace("\r", "\\r")


def write_manifest(shard_dir: Path, manifest: dict, skipped: Iterable[dict]) -> Path:
    """Write atomically (tmp + rename), streaming `skipped` as the last key: a list of millions of skipped
    files is never held in memory at once."""
    assert manifest and "skipped" not in manifest
    path = manifest_path(shard_dir)
    tmp = path.with_name(path.name + ".tmp")
    head = json.dumps(manifest, indent=1)  # "{\n ...\n}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head[:-1].rstrip() + ',\n "skipped": [')
        separator = "\n  "
        for entry in skipped:
            f.write(separator + json.dumps(entry))
            separator = ",\n  "
        f.write("\n ]\n}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
