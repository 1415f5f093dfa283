"""Random access into WebDataset tar shards through their DALI index files.

Why indexed access rather than streaming the tars: with a table of (shard, byte offset, size) per sample,
an epoch is a permutation of 0..N-1 split over ranks (pipelines/sampler.py), which gives
- every sample exactly once per epoch, whatever the number of shards, ranks and DataLoader workers;
- the same number of steps on every rank (streaming shard-per-worker splits leave ragged tails);
- a full shuffle over the whole dataset, not a shuffle buffer inside a few open shards;
- exact resume: a step number identifies the remaining batches.
Reads are one `os.pread` per sample on local (or page-cached) files. A streaming mode for network storage,
where random reads are expensive, can come later beside this one (webdataset's streaming reader fits there).
The tars follow webdataset's conventions (members "<key>.<ext>", key and extension split at the first dot);
tests/pipelines cross-check every read against a sequential `webdataset.WebDataset` pass. The format itself (the
manifest, the sample members, the DALI index files) is written down in pipelines/shard_format.py.
"""

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pirl_trainer.pipelines.shard_format import (INT64_BYTES, MANIFEST_NAME, ShardFormatError, decode_int64, is_beton,
                                                 member_name, read_index_file, read_manifest, sample_key,
                                                 split_member_name)

# Open shard files kept per process: ImageNet in the default 256 MB shards is ~550 files, smaller shards or
# YFCC-scale sets are thousands, past a typical 1,024 soft limit on open files per process.
MAX_OPEN_SHARDS = 128


ShardIndexError = ShardFormatError  # the name callers of this module catch; one class


@dataclass(frozen=True)
class SampleTable:
    """Where every sample lives. Row i is the sample with global index i; 32 bytes a row (41 MB for ImageNet),
    in numpy arrays so that forked DataLoader workers share the pages instead of copying refcounted objects.

    All members of a sample are contiguous in its tar, so one read of [start, start + length) returns the
    whole sample; the *_at columns are offsets inside that span.
    """

    shard_dir: Path
    tar_paths: list[str]  # shard id -> tar path
    shard: np.ndarray  # (N,) int32 shard id
    start: np.ndarray  # (N,) int64 byte offset of the sample's first member data
    length: np.ndarray  # (N,) int32 bytes from start to the end of its last member
    jpg_at: np.ndarray  # (N,) int32
    jpg_size: np.ndarray  # (N,) int32
    idx_at: np.ndarray  # (N,) int32
    label_at: np.ndarray  # (N,) int32, -1 when the shards are unlabelled
    classes: list[str] | None
    labelled: bool

    @property
    def num_samples(self) -> int:
        return len(self.shard)


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _shard_columns(
    idx_path: Path, tar_path: Path, first_idx: int, labelled: bool
) -> dict[str, np.ndarray]:
    """Check one shard's index against the format and its tar; its rows of the SampleTable columns."""
    cols = read_index_file(idx_path)
    n = len(cols)

    def where(row: int) -> str:
        return f"{idx_path}:{row + 2}"  # line 1 is the header

    for ext in ("jpg", "idx", "label") if labelled else ("jpg", "idx"):
        if ext not in cols.offsets or (cols.offsets[ext] < 0).any():
            row = _first(cols.offsets[ext] < 0) if ext in cols.offsets else 0
            raise ShardIndexError(f"{where(row)}: sample has no {ext!r} member")
    keys = [sample_key(first_idx + row) for row in range(n)]
    for ext, names in cols.names.items():
        expected = [member_name(key, ext) for key in keys]
        if names != expected:
            row = next(r for r in range(n) if names[r] != expected[r])
            key = split_member_name(names[row])[0] if names[row] else None
            raise ShardIndexError(
                f"{where(row)}: key {key!r}, expected {keys[row]} (global index {first_idx + row})"
            )
    for ext in ("idx", "label") if labelled else ("idx",):
        if (cols.sizes[ext] != INT64_BYTES).any():
            row = _first(cols.sizes[ext] != INT64_BYTES)
            raise ShardIndexError(f"{where(row)}: {ext!r} member has {cols.sizes[ext][row]} bytes, "
                                  f"expected {INT64_BYTES}")
    offsets = np.stack(list(cols.offsets.values()))  # (members, n)
    ends = offsets + np.stack(list(cols.sizes.values()))
    start, end = offsets.min(axis=0), ends.max(axis=0)
    tar_size = tar_path.stat().st_size
    if (end > tar_size).any():
        row = _first(end > tar_size)
        raise ShardIndexError(f"{where(row)}: member ends at byte {end[row]}, past the end of {tar_path} "
                              f"({tar_size} bytes): stale index?")
    return {
        "start": start,
        "length": end - start,
        "jpg_at": cols.offsets["jpg"] - start,
        "jpg_size": cols.sizes["jpg"],
        "idx_at": cols.offsets["idx"] - start,
        "label_at": cols.offsets["label"] - start if labelled else np.full(n, -1, dtype=np.int64),
    }


def build_sample_table(shard_dir: str | os.PathLike) -> SampleTable:
    """Read manifest.json and every shard's .idx into a SampleTable, checking them against each other."""
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / MANIFEST_NAME
    manifest = read_manifest(shard_dir)
    if is_beton(manifest):
        raise ShardIndexError(
            f"{shard_dir} holds an FFCV .beton (tools/make_shards.py --format beton), not WebDataset shards: "
            "read it with data.backend=ffcv, or point this backend at the shards it was converted from"
        )
    labelled = bool(manifest["labelled"])
    n = int(manifest["num_samples"])
    parts: list[dict[str, np.ndarray]] = []
    tar_paths = []
    row = 0
    for shard_id, shard in enumerate(manifest["shards"]):
        tar_path = shard_dir / shard["file"]
        idx_path = shard_dir / shard["index_file"]
        for p in (tar_path, idx_path):
            if not p.is_file():
                raise ShardIndexError(f"{p}: listed in {manifest_path} but missing")
        size = tar_path.stat().st_size
        if size != shard["bytes"]:
            raise ShardIndexError(f"{tar_path}: {size} bytes, {manifest_path} says {shard['bytes']}: truncated or "
                                  "altered since it was written; copy it again or re-make the shards")
        if shard["first_idx"] != row:
            raise ShardIndexError(
                f"{manifest_path}: shards[{shard_id}] first_idx={shard['first_idx']}, expected {row} "
                "(shards must hold consecutive idx ranges)"
            )
        part = _shard_columns(idx_path, tar_path, row, labelled)
        count = len(part["start"])
        if count != shard["samples"]:
            raise ShardIndexError(f"{idx_path}: {count} samples, manifest says {shard['samples']} for {shard['file']}")
        part["shard"] = np.full(count, shard_id, dtype=np.int64)
        parts.append(part)
        tar_paths.append(str(tar_path))
        row += count
    if row != n:
        raise ShardIndexError(f"{manifest_path}: num_samples={n} but the shards hold {row}")
    columns = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
               for name in ("shard", "start", "length", "jpg_at", "jpg_size", "idx_at", "label_at")}
    narrow = {name: col.astype(np.int32) for name, col in columns.items() if name != "start"}
    return SampleTable(
        shard_dir=shard_dir,
        tar_paths=tar_paths,
        start=columns["start"],
        classes=list(manifest["classes"]) if labelled else None,
        labelled=labelled,
        **narrow,
    )


def data_files(shard_dir: str | os.PathLike) -> list[tuple[Path, int, str]]:
    """(path, bytes, sha256) of every data file a manifest lists: the tar shards, or a .beton."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if is_beton(manifest):
        beton = manifest["beton"]
        return [(shard_dir / beton["file"], int(beton["bytes"]), beton["sha256"])]
    return [(shard_dir / s["file"], int(s["bytes"]), s["sha256"]) for s in manifest["shards"]]


def file_sha256(path: str | os.PathLike, progress=None) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks; `progress` (optional) is called with each block's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def verify_checksums(shard_dir: str | os.PathLike, progress=None) -> None:
    """Hash every data file against its manifest's sha256 (reads every byte: seconds per GB); raise
    ShardIndexError naming the first file that is missing, of another size or altered. `progress`: a callable
    taking the byte count read so far, e.g. a tqdm bar's update."""
    for path, size, digest in data_files(shard_dir):
        if not path.is_file():
            raise ShardIndexError(f"{path}: listed in {Path(shard_dir) / MANIFEST_NAME} but missing")
        if path.stat().st_size != size:
            raise ShardIndexError(f"{path}: {path.stat().st_size} bytes, the manifest says {size}: truncated or "
                                  "altered")
        actual = file_sha256(path, progress)
        if actual != digest:
            raise ShardIndexError(f"{path}: sha256 {actual} differs from the manifest's {digest}: the file was "
                                  "altered since it was written; copy it again or re-make the shards")


def read_labels(table: SampleTable, indexes: np.ndarray) -> np.ndarray:
    """(n,) int64 labels of these global sample indexes, read as the 8 bytes of each `label` member alone (no image
    bytes): ~1 us a sample from the page cache, one 4 KiB disk read each when cold (readahead is turned off here,
    else each 8-byte read would pull in the image bytes around it)."""
    if not table.labelled:
        raise ShardIndexError(f"{table.shard_dir}: the shards are unlabelled")
    indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
    labels = np.empty(len(indexes), dtype=np.int64)
    order = np.lexsort((table.start[indexes], table.shard[indexes]))  # file by file, in file order
    in_shard = table.shard[indexes[order]]
    for rows in np.split(order, np.flatnonzero(np.diff(in_shard)) + 1) if len(order) else []:
        path = table.tar_paths[int(table.shard[indexes[rows[0]]])]
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for row, at in zip(rows.tolist(), (table.start[indexes[rows]] + table.label_at[indexes[rows]]).tolist()):
                data = os.pread(fd, INT64_BYTES, at)
                if len(data) != INT64_BYTES:
                    raise ShardIndexError(f"{path}: short read of sample {indexes[row]}'s label: truncated tar?")
                labels[row] = decode_int64(data)
        finally:
            os.close(fd)
    bad = np.flatnonzero((labels < 0) | (labels >= len(table.classes)))
    if len(bad):
        i = int(indexes[bad[0]])
        raise ShardIndexError(f"{table.tar_paths[int(table.shard[i])]}: sample {sample_key(i)} has label "
                              f"{labels[bad[0]]}, outside 0..{len(table.classes) - 1}")
    return labels


@dataclass
class RawSample:
    jpg: memoryview  # the JPEG bytes (a view into the read buffer)
    index: int
    label: int | None


class ShardReader:
    """Reads samples of a SampleTable by global index with one pread each.

    Keeps an LRU cache of open file descriptors per process: DataLoader workers fork with the parent's
    reader, so the cache is reset when the process id changes (the parent's descriptors stay the parent's).
    """

    def __init__(self, table: SampleTable, max_open: int = MAX_OPEN_SHARDS):
        self.table = table
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(shard_id)
        if fd is not None:
            self._fds.move_to_end(shard_id)
            return fd
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(self.table.tar_paths[shard_id], os.O_RDONLY)
        self._fds[shard_id] = fd
        return fd

    def read(self, i: int) -> RawSample:
        t = self.table
        shard_id = int(t.shard[i])
        length = int(t.length[i])
        buf = bytearray(length)
        got = os.preadv(self._fd(shard_id), [buf], int(t.start[i]))
        if got != length:
            raise ShardIndexError(
                f"{t.tar_paths[shard_id]}: short read of sample {i} ({got} of {length} bytes): truncated tar?"
            )
        view = memoryview(buf)
        idx_at = int(t.idx_at[i])
        index = decode_int64(view[idx_at:idx_at + INT64_BYTES])
        if index != i:
            raise ShardIndexError(
                f"{t.tar_paths[shard_id]}: sample {sample_key(i)} carries idx {index}: index file and tar disagree"
            )
        label = None
        if t.labelled:
            label_at = int(t.label_at[i])
            label = decode_int64(view[label_at:label_at + INT64_BYTES])
            if not 0 <= label < len(t.classes):
                raise ShardIndexError(
                    f"{t.tar_paths[shard_id]}: sample {sample_key(i)} has label {label}, "
                    f"outside 0..{len(t.classes) - 1}"
                )
        jpg_at = int(t.jpg_at[i])
        return RawSample(jpg=view[jpg_at:jpg_at + int(t.jpg_size[i])], index=index, label=label)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        # Descriptors are per process: a pickled reader (spawn-started workers) opens its own.
        return {"table": self.table, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["table"], state["max_open"])
