"""Writes samples into size-capped WebDataset tar shards, each with its DALI index file.

A shard is written as `<name>.tar.tmp` / `<name>.idx.tmp` and renamed to its final name only once complete,
so a final name always means a complete file. Offsets for the index are known while writing; the tar is
never re-scanned.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from pirl_trainer.pipelines.shard_format import index_line, index_text, member_name, shard_file_names

# Fixed member metadata, so that the same input gives byte-identical shards.
MEMBER_MTIME = 0
MEMBER_MODE = 0o444


def member_bytes(size: int) -> int:
    """Bytes one ustar member takes: a 512-byte header, then the data padded to whole blocks."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def finished_tar_bytes(offset: int) -> int:
    """File size after tarfile.close(): two zero blocks end the archive, then padding to a whole record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    def __init__(self, out_dir: Path, prefix: str, shard_size: int):
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_size = shard_size
        self.records: list[dict] = []  # one per finished shard, as in the manifest's "shards"
        self._file = None
        self._tar: tarfile.TarFile | None = None

    def add(self, idx: int, key: str, entries: list[tuple[str, bytes]]) -> None:
        """Append one sample; starts a new shard first when this one would end up larger than shard_size
        (a sample larger than shard_size alone gets a shard of its own)."""
        size = sum(member_bytes(len(payload)) for _, payload in entries)
        if self._tar is not None and finished_tar_bytes(self._tar.offset + size) > self.shard_size:
            self._finish_shard()
        if self._tar is None:
            self._start_shard(idx)
        components = []
        for ext, payload in entries:
            name = member_name(key, ext)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), MEMBER_MTIME, MEMBER_MODE
            header_offset = self._tar.offset
            self._tar.addfile(info, io.BytesIO(payload))
            # ustar with short names writes exactly one header block (no pax or GNU long-name blocks).
            assert self._tar.offset == header_offset + member_bytes(len(payload)), name
            components.append((ext, header_offset + tarfile.BLOCKSIZE, len(payload), name))
        self._index_lines.append(index_line(components))

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish_shard()
        return self.records

    def abort(self) -> None:
        """Drop the shard in progress (its .tmp file); finished shards stay."""
        if self._file is not None:
            self._file.close()
            self._tmp_tar.unlink(missing_ok=True)
        self._file = self._tar = None

    def _start_shard(self, first_idx: int) -> None:
        tar_name, idx_name = shard_file_names(self.prefix, len(self.records))
        self._tar_path = self.out_dir / tar_name
        self._idx_path = self.out_dir / idx_name
        self._tmp_tar = self._tar_path.with_name(self._tar_path.name + ".tmp")
        self._file = _HashingFile(open(self._tmp_tar, "wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self._first_idx = first_idx

    def _finish_shard(self) -> None:
        expected = finished_tar_bytes(self._tar.offset)
        self._tar.close()  # leaves self._file open: it was passed in as fileobj
        sha256 = self._file.sha256.hexdigest()
        self._file.sync_close()
        self._file = self._tar = None
        size = self._tmp_tar.stat().st_size
        assert size == expected, (self._tmp_tar, size, expected)
        tmp_idx = self._idx_path.with_name(self._idx_path.name + ".tmp")
        with open(tmp_idx, "w", encoding="ascii", newline="\n") as f:
            f.write(index_text(self._index_lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_tar, self._tar_path)
        os.replace(tmp_idx, self._idx_path)
        self.records.append(
            {
                "file": self._tar_path.name,
                "index_file": self._idx_path.name,
                "samples": len(self._index_lines),
                "bytes": size,
                "first_idx": self._first_idx,
                "sha256": sha256,
            }
        )


class _HashingFile:
    """The tar's file object: hashes the bytes as they are written, so verify can detect any changed byte
    without the writer reading the shard back."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def sync_close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
