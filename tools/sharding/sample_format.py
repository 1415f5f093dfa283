"""The entries of one shard sample (the shard format in docs/data.md)."""

from __future__ import annotations

import struct

# Little-endian int64: DALI reads a fixed-size binary entry with dtypes=INT64; text of varying length would make
# a ragged batch (DEPENDENCIES.md, "DALI without a GPU").
_INT64 = struct.Struct("<q")


def sample_key(idx: int) -> str:
    # Dot-free: webdataset and DALI split a member name into key and extension at the first dot.
    return f"{idx:09d}"


def encode_int64(value: int) -> bytes:
    return _INT64.pack(value)


def decode_int64(payload: bytes) -> int:
    if len(payload) != _INT64.size:
        raise ValueError(f"expected {_INT64.size} bytes of little-endian int64, got {len(payload)}")
    return _INT64.unpack(payload)[0]


def sample_entries(idx: int, jpg: bytes, label: int | None) -> list[tuple[str, bytes]]:
    """(extension, payload) pairs in the order they are written to the tar."""
    entries = [("jpg", jpg), ("idx", encode_int64(idx))]
    if label is not None:
        entries += [("cls", str(label).encode("ascii")), ("label", encode_int64(label))]
    return entries


def expected_extensions(labelled: bool) -> tuple[str, ...]:
    return ("jpg", "idx", "cls", "label") if labelled else ("jpg", "idx")
