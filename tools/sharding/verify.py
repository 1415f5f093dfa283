"""Re-read a shard folder and check it against its manifest (make_shards --verify).

Streams every tar (never loads a shard whole) and checks: file sizes, samples per shard, the member set of each
sample, key == idx, idx contiguous over 0..N-1 in shard order, cls == label and within the class list, JPEG
start-of-image marker, the DALI index file byte for byte, manifest totals, one line per sample in the sample-names
file (where the manifest lists one), and stray files in the folder.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pirl_trainer.pipelines.shard_format import (MANIFEST_NAME, decode_int64, expected_extensions, index_line,
                                                 index_text, read_manifest, sample_key, sample_names_file,
                                                 shard_files, split_member_name)

JPEG_SOI = b"\xff\xd8"  # every JPEG starts with the start-of-image marker
MAX_PROBLEMS_PER_SHARD = 20  # beyond this a shard is clearly broken; more lines would drown the summary


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(shard_dir: str | Path) -> VerifyReport:
    shard_dir = Path(shard_dir)
    report = VerifyReport()
    manifest = manifest_or_problem(shard_dir, report)
    if manifest is None:
        return report
    labelled = manifest["labelled"]
    num_classes = len(manifest["classes"]) if manifest["classes"] is not None else None
    next_idx = 0
    for record, (tar_path, idx_path) in zip(manifest["shards"], shard_files(shard_dir, manifest)):
        report.shards += 1
        if record["first_idx"] != next_idx:
            report.problems.append(f"{tar_path.name}: manifest first_idx {record['first_idx']}, expected {next_idx}")
        problems: list[str] = []
        count = _verify_shard(tar_path, idx_path, record, next_idx, labelled, num_classes, problems)
        report.problems += problems[:MAX_PROBLEMS_PER_SHARD]
        if len(problems) > MAX_PROBLEMS_PER_SHARD:
            report.problems.append(f"{tar_path.name}: {len(problems) - MAX_PROBLEMS_PER_SHARD} more problems")
        report.samples += count
        next_idx += record["samples"]
    if manifest["num_samples"] != next_idx:
        report.problems.append(f"manifest num_samples {manifest['num_samples']}, its shards list {next_idx}")
    data_files = {name for s in manifest["shards"] for name in (s["file"], s["index_file"])}
    report.problems += folder_problems(shard_dir, manifest, data_files)
    return report


def manifest_or_problem(shard_dir: Path, report: VerifyReport) -> dict | None:
    """The folder's manifest, or None with the reason it cannot be read added to the report."""
    try:
        return read_manifest(shard_dir)
    except (FileNotFoundError, ValueError) as e:
        report.problems.append(str(e))
        return None


def folder_problems(shard_dir: Path, manifest: dict, data_files: set[str]) -> list[str]:
    """The checks a folder of either format gets besides its data files: num_skipped against the skipped list, the
    sample-names file, and no file but the manifest, `data_files` and the sample names."""
    problems = []
    if manifest.get("num_skipped", len(manifest["skipped"])) != len(manifest["skipped"]):
        problems.append(
            f"manifest num_skipped {manifest['num_skipped']}, its skipped list has {len(manifest['skipped'])}"
        )
    expected_files = {MANIFEST_NAME} | data_files
    names = sample_names_file(shard_dir, manifest)
    if names is not None:
        expected_files.add(names.name)
        problems += sample_names_problems(names, manifest["num_samples"])
    for path in sorted(shard_dir.iterdir()):
        if path.name not in expected_files:
            kind = "stale temporary file" if path.name.endswith(".tmp") else "file not in the manifest"
            problems.append(f"{path.name}: {kind}")
    return problems


def sample_names_problems(path: Path, num_samples: int) -> list[str]:
    """A sample-names file the manifest lists must exist and hold one line per sample."""
    if not path.is_file():
        return [f"{path.name}: listed in the manifest but missing"]
    with open(path, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return [] if lines == num_samples else [f"{path.name}: {lines} lines, manifest num_samples {num_samples}"]


def _verify_shard(
    tar_path: Path,
    idx_path: Path,
    record: dict,
    first_idx: int,
    labelled: bool,
    num_classes: int | None,
    problems: list[str],
) -> int:
    name = tar_path.name
    if not tar_path.is_file():
        problems.append(f"{name}: missing")
        return 0
    size = tar_path.stat().st_size
    if size != record["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {record['bytes']}")
    # per sample: key, {ext: payload} (only the marker of a jpg: a shard is never held in memory), index components
    samples: list[dict] = []
    digest = hashlib.sha256()
    try:
        with open(tar_path, "rb") as raw:
            reader = _HashingReader(raw, digest)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if unsafe_member_name(member.name):  # reported, never read, never used as a path
                        problems.append(f"{name}: unsafe member name {member.name!r} (absolute or with '..'): refused")
                        continue
                    if not member.isfile():
                        problems.append(f"{name}: member {member.name} is not a regular file")
                        continue
                    key, ext = split_member_name(member.name)
                    if not samples or samples[-1]["key"] != key:
                        samples.append({"key": key, "payloads": {}, "components": []})
                    payload = tar.extractfile(member).read()
                    samples[-1]["payloads"][ext] = payload[: len(JPEG_SOI)] if ext == "jpg" else payload
                    samples[-1]["components"].append((ext, member.offset_data, member.size, member.name))
            while reader.read(1 << 20):  # the end-of-archive padding tarfile may leave unread
                pass
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{name}: unreadable tar: {type(e).__name__}: {e}")
        return len(samples)
    if "sha256" in record and digest.hexdigest() != record["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest's: the file was changed after it was written")

    if len(samples) != record["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {record['samples']}")
    wanted = set(expected_extensions(labelled))
    for offset, sample in enumerate(samples):
        _verify_sample(name, sample, first_idx + offset, wanted, num_classes, problems)
    _verify_index(idx_path, samples, problems)
    return len(samples)


def unsafe_member_name(member_name: str) -> bool:
    """A tar member name that would point outside a folder if anything used it as a path."""
    parts = member_name.replace("\\", "/").split("/")
    return member_name.startswith(("/", "\\")) or ".." in parts or (len(member_name) > 1 and member_name[1] == ":")


class _HashingReader:
    """Hashes what tarfile reads; the stream mode ("r|") only ever reads forwards."""

    def __init__(self, f, digest):
        self._f, self._digest = f, digest

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._digest.update(data)
        return data


def _verify_sample(
    shard: str, sample: dict, expected_idx: int, wanted: set[str], num_classes: int | None, problems: list[str]
) -> None:
    key, payloads = sample["key"], sample["payloads"]
    where = f"{shard}: sample {key}"
    if set(payloads) != wanted:
        problems.append(f"{where}: entries {sorted(payloads)}, expected {sorted(wanted)}")
    if "idx" in payloads:
        try:
            idx = decode_int64(payloads["idx"])
        except ValueError as e:
            problems.append(f"{where}: idx: {e}")
        else:
            if idx != expected_idx:
                problems.append(f"{where}: idx {idx}, expected {expected_idx} (indexes must run 0..N-1 in order)")
            if key != sample_key(idx):
                problems.append(f"{where}: key does not match idx {idx}")
    if "jpg" in payloads and not payloads["jpg"].startswith(JPEG_SOI):
        problems.append(f"{where}: jpg does not start with a JPEG start-of-image marker")
    if "label" in payloads and "cls" in payloads:
        try:
            label = decode_int64(payloads["label"])
        except ValueError as e:
            problems.append(f"{where}: label: {e}")
            return
        if payloads["cls"] != str(label).encode("ascii"):
            problems.append(f"{where}: cls {payloads['cls']!r} differs from label {label}")
        if num_classes is not None and not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} outside the {num_classes} manifest classes")


def _verify_index(idx_path: Path, samples: list[dict], problems: list[str]) -> None:
    if not idx_path.is_file():
        problems.append(f"{idx_path.name}: missing")
        return
    expected = index_text([index_line(s["components"]) for s in samples])
    actual = idx_path.read_text(encoding="ascii", errors="replace")
    if actual != expected:
        actual_lines, expected_lines = actual.splitlines(), expected.splitlines()
        line = next(
            (i for i, (a, b) in enumerate(zip(actual_lines, expected_lines)) if a != b),
            min(len(actual_lines), len(expected_lines)),
        )
        problems.append(f"{idx_path.name}: differs from the tar's contents from line {line + 1}")
