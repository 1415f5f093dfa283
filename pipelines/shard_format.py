"""The shard format, written down once: what tools/make_shards.py writes and every reader in pipelines/ expects.

A shard folder holds
- `manifest.json`: what the folder holds (keys in docs/data.md). Written last, atomically, so a folder without one
  is not a shard folder or an unfinished run;
- WebDataset tar shards `<prefix>-000000.tar`, ...: per sample the members `<key>.jpg`, `<key>.idx` and, when
  labelled, `<key>.cls` (ASCII) and `<key>.label`, in that order; key = the global index as `%09d`;
- beside each tar its DALI index file `<prefix>-000000.idx` (`wds2idx` format, below);
- `sample_names.txt`: line i names sample i's source.
(`--format beton` holds one FFCV `dataset.beton` instead of the tars, and a manifest saying so.)

Both sides use this module: tools/sharding writes with it (the layer rule lets tools import pipelines, not the
other way), pipelines/shard_index.py reads with it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------------ manifest

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "num_samples", "labelled", "classes", "shards", "skipped", "options", "source")
REQUIRED_SHARD_KEYS = ("file", "index_file", "samples", "bytes", "first_idx")
# Optional key (folders made before it lack it): the file, beside the manifest, whose line i is sample i's source
# name (its path relative to the input folder, or the list file's entry); data.subset matches image names in it.
SAMPLE_NAMES_KEY = "sample_names"
SAMPLE_NAMES_FILE = "sample_names.txt"
BETON_FORMAT = "beton"  # the manifest's optional `format` key: absent for WebDataset shards


class ShardFormatError(ValueError):
    """A shard folder, manifest, index file or tar that does not match the shard format."""


class ManifestNotFoundError(ShardFormatError, FileNotFoundError):
    """A folder without manifest.json. Also a FileNotFoundError: what callers of the writer's tools catch for a
    missing file."""


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    """OUT/manifest.json of a shard folder; the manifest's own path is returned as it is."""
    path = Path(shard_dir)
    return path if path.name == MANIFEST_NAME else path / MANIFEST_NAME


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a shard folder (or the manifest.json path itself), checked for every key a reader of either
    format uses; a ShardFormatError (ManifestNotFoundError when it is missing) names the file and the key."""
    path = manifest_path(shard_dir)
    if not path.is_file():
        raise ManifestNotFoundError(f"{path}: no manifest; make the shards with tools/make_shards.py (a folder "
                                    f"without {MANIFEST_NAME} is not a shard folder, or an unfinished run)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path}: corrupt manifest, not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: corrupt manifest: top level is {type(manifest).__name__}, expected an object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ShardFormatError(f"{path}: manifest lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: manifest format_version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    for k, shard in enumerate(manifest["shards"]):
        missing = [key for key in REQUIRED_SHARD_KEYS if key not in shard]
        if missing:
            raise ShardFormatError(f"{path}: shards[{k}] lacks keys {missing}")
    if manifest["labelled"] and not manifest["classes"]:
        raise ShardFormatError(f"{path}: labelled is true but classes is empty")
    return manifest


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


def is_beton(manifest: dict) -> bool:
    """Whether a manifest describes an FFCV .beton rather than WebDataset shards."""
    return manifest.get("format") == BETON_FORMAT


def shard_files(shard_dir: str | os.PathLike, manifest: dict) -> list[tuple[Path, Path]]:
    """(tar path, DALI index path) of every shard, in idx order."""
    folder = manifest_path(shard_dir).parent
    return [(folder / s["file"], folder / s["index_file"]) for s in manifest["shards"]]


def shard_file_names(prefix: str, number: int) -> tuple[str, str]:
    """(tar name, DALI index name) of the shard numbered `number`."""
    name = f"{prefix}-{number:06d}"
    return f"{name}.tar", f"{name}.idx"


def sample_names_file(shard_dir: str | os.PathLike, manifest: dict) -> Path | None:
    """The sample-names file a manifest lists, or None for a folder made without one."""
    name = manifest.get(SAMPLE_NAMES_KEY)
    return None if name is None else manifest_path(shard_dir).parent / name


def encode_sample_name(name: str) -> str:
    """One line of the sample-names file: a newline or carriage return inside a name would shift every later
    line off its sample, so they are written as the two characters \\n and \\r."""
    return name.replace("\n", "\\n").replace("\r", "\\r")


# -------------------------------------------------------------------------------------------------------- samples

# Little-endian int64: DALI reads a fixed-size binary entry with dtypes=INT64; text of varying length would make
# a ragged batch (DEPENDENCIES.md, "DALI without a GPU").
_INT64 = struct.Struct("<q")
INT64_BYTES = _INT64.size


def sample_key(idx: int) -> str:
    # Dot-free: webdataset and DALI split a member name into key and extension at the first dot.
    return f"{idx:09d}"


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension): split at the first dot, as webdataset and DALI do."""
    key, _, ext = name.partition(".")
    return key, ext


def encode_int64(value: int) -> bytes:
    return _INT64.pack(value)


def decode_int64(payload: bytes | memoryview) -> int:
    if len(payload) != INT64_BYTES:
        raise ValueError(f"expected {INT64_BYTES} bytes of little-endian int64, got {len(payload)}")
    return _INT64.unpack(payload)[0]


def sample_entries(idx: int, jpg: bytes, label: int | None) -> list[tuple[str, bytes]]:
    """(extension, payload) pairs in the order they are written to the tar."""
    entries = [("jpg", jpg), ("idx", encode_int64(idx))]
    if label is not None:
        entries += [("cls", str(label).encode("ascii")), ("label", encode_int64(label))]
    return entries


def expected_extensions(labelled: bool) -> tuple[str, ...]:
    return ("jpg", "idx", "cls", "label") if labelled else ("jpg", "idx")


# ------------------------------------------------------------------------------------------------ DALI index files
# The format of `wds2idx` shipped in the nvidia-dali wheel (IndexCreator.create_index, DALI 2.4): a header line
# "v1.2 <number of samples>", then one line per sample listing each of its tar members as
# "<ext> <data offset> <size> <member name>", all separated by single spaces, in tar order. The data offset is the
# member header's offset plus one 512-byte tar block.

INDEX_VERSION = "v1.2"  # wds2idx.IndexCreator.index_file_version

# (extension, data offset in the tar, size in bytes, member name)
Component = tuple[str, int, int, str]


def index_line(components: Iterable[Component]) -> str:
    """One sample's line of an index file."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def index_text(sample_lines: list[str]) -> str:
    """A whole index file: the header, then one line per sample."""
    return f"{INDEX_VERSION} {len(sample_lines)}\n" + "".join(line + "\n" for line in sample_lines)


def parse_index_line(line: str) -> dict[str, tuple[int, int, str]]:
    """One sample's line -> {ext: (data offset, size, member name)}."""
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError(f"expected groups of 4 fields (ext offset size name), got {len(fields)} fields")
    return {
        fields[k]: (int(fields[k + 1]), int(fields[k + 2]), fields[k + 3]) for k in range(0, len(fields), 4)
    }


@dataclass
class IndexColumns:
    """One index file as columns, one entry per sample (line) and member extension."""

    offsets: dict[str, np.ndarray]  # ext -> (n,) int64 data offset in the tar, -1 where a sample lacks it
    sizes: dict[str, np.ndarray]  # ext -> (n,) int64 bytes
    names: dict[str, list[str | None]]  # ext -> member names

    def __len__(self) -> int:
        return len(next(iter(self.names.values()), []))


def _regular_columns(tokens: list[str], num_samples: int) -> IndexColumns | None:
    """Fast path for the usual file whose every line lists the same members in the same order:
    column slices of the token list instead of a parse per line (~1 us a sample instead of ~10)."""
    width = len(tokens) // num_samples if num_samples else 0
    if width == 0 or width % 4 or width * num_samples != len(tokens):
        return None
    exts = tokens[0:width:4]
    if len(set(exts)) != len(exts):
        return None
    for c, ext in enumerate(exts):
        if tokens[4 * c::width] != [ext] * num_samples:
            return None
    try:
        offsets = {ext: np.array(tokens[4 * c + 1::width], dtype=np.int64) for c, ext in enumerate(exts)}
        sizes = {ext: np.array(tokens[4 * c + 2::width], dtype=np.int64) for c, ext in enumerate(exts)}
    except ValueError:
        return None
    names = {ext: tokens[4 * c + 3::width] for c, ext in enumerate(exts)}
    return IndexColumns(offsets, sizes, names)


def _irregular_columns(path: str | os.PathLike, lines: list[str]) -> IndexColumns:
    """Line-by-line parse: any member layout, errors with the line number."""
    parsed = []
    for lineno, line in enumerate(lines, start=2):
        try:
            parsed.append(parse_index_line(line))
        except ValueError as err:
            raise ShardFormatError(f"{path}:{lineno}: {err}") from err
    exts = sorted({ext for members in parsed for ext in members})
    offsets = {ext: np.array([m.get(ext, (-1, 0, None))[0] for m in parsed], dtype=np.int64) for ext in exts}
    sizes = {ext: np.array([m.get(ext, (-1, 0, None))[1] for m in parsed], dtype=np.int64) for ext in exts}
    names = {ext: [m.get(ext, (-1, 0, None))[2] for m in parsed] for ext in exts}
    return IndexColumns(offsets, sizes, names)


def read_index_file(path: str | os.PathLike) -> IndexColumns:
    """All samples of one DALI index file, in tar order."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    if not lines:
        raise ShardFormatError(f"{path}: empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardFormatError(f"{path}: header {lines[0]!r} is not '{INDEX_VERSION} <num_samples>'")
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != int(header[1]):
        raise ShardFormatError(f"{path}: header says {header[1]} samples, found {len(body)} lines")
    return _regular_columns(text.split()[2:], len(body)) or _irregular_columns(path, body)
