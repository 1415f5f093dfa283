"""build_shards: input source → checked images (worker pool, input order) → shards + DALI indexes + sample names +
manifest."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

from pirl_trainer.pipelines.shard_format import (FORMAT_VERSION, MANIFEST_NAME, SAMPLE_NAMES_FILE, SAMPLE_NAMES_KEY,
                                                 encode_sample_name, read_manifest, sample_entries, sample_key,
                                                 write_manifest)
from pirl_trainer.tools.sharding.image_check import (DEFAULT_MAX_PIXELS, JPEG_QUALITY, CheckOptions, CheckResult,
                                                     check_file)
from pirl_trainer.tools.sharding.ordered_pool import OrderedPool
from pirl_trainer.tools.sharding.progress import Progress
from pirl_trainer.tools.sharding.shard_writer import ShardWriter
from pirl_trainer.tools.sharding.sources import ClassIndex, Entry, open_source

# 256 MiB: WebDataset's docs advise shards of ~100 MB-1 GB for streaming reads. ImageNet-1k train
# (ILSVRC2012_img_train.tar: 137.7 GiB) then makes ~550 shards, several for each of the 64 readers
# of an 8-GPU x 8-loader-worker run.
DEFAULT_SHARD_SIZE = 256 * 2**20
DEFAULT_PREFIX = "shard"
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")


class OutputNotEmptyError(FileExistsError):
    """make_shards never appends to or overwrites an existing shard folder."""


def check_entry(entry: Entry, options: CheckOptions) -> CheckResult:
    """Worker-side: an entry the source already rejected passes through; others are read and decoded."""
    if entry.skip_reason is not None:
        return CheckResult(None, entry.skip_reason)
    return check_file(entry.path, options)


def _crashed(entry: Entry) -> CheckResult:
    return CheckResult(None, "worker crashed: the decoder process died or hung on this file (segfault, out of memory, "
                             "300 s without a result)")


def reason_category(reason: str) -> str:
    return reason.split(":", 1)[0]


def build_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int | None = None,
    show_progress: bool = False,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefix: str = DEFAULT_PREFIX,
    jpeg_quality: int = JPEG_QUALITY,
    labels: str | os.PathLike | None = None,
    classes: str | os.PathLike | ClassIndex | None = None,
) -> dict:
    """Make WebDataset shards of `src` (image folder tree, list file, or flat image folder with `labels`) in the
    new or empty folder `out`.

    labels: a labels file for a flat folder (sources.read_labels). classes: the class index to label with, a shard
    folder (its manifest's classes) or a file of names (sources.read_class_index). workers=0 decodes in this
    process; workers>=1 uses that many spawned processes. Returns the manifest as written to out/manifest.json.
    Raises OutputNotEmptyError if `out` holds anything, SourceError (nothing written) for labels that do not fit.
    """
    src, out = Path(src), Path(out)
    if shard_size < 1 or max_pixels < 1 or (max_side is not None and max_side < 1):
        raise ValueError(
            f"shard_size, max_pixels and max_side must be positive: {shard_size}, {max_pixels}, {max_side}"
        )
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    source = open_source(src, labels=labels, classes=classes)
    _prepare_output(out, source.input_root)

    options = CheckOptions(max_pixels=max_pixels, max_side=max_side, jpeg_quality=jpeg_quality)
    writer = ShardWriter(out, prefix, shard_size)
    names_tmp = out / f"{SAMPLE_NAMES_FILE}.tmp"  # renamed once every sample is written, like a shard
    progress = Progress(show_progress)
    skip_counts: Counter[str] = Counter()
    reencoded: Counter[str] = Counter()
    max_label = -1
    num_samples = 0
    # Skipped entries go to an anonymous temporary file: a 100M-line list may have millions of dead paths.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as skipped:
        try:
            # surrogateescape: a path that is not valid UTF-8 keeps its bytes
            with (OrderedPool(partial(check_entry, options=options), workers, on_crash=_crashed) as pool,
                  open(names_tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as names):
                for entry, result in pool.map(source):
                    if entry.label is not None:
                        max_label = max(max_label, entry.label)
                    progress.update(result.data is not None, result.source_bytes)
                    if result.data is None:
                        skipped.write(json.dumps({"path": entry.path, "reason": result.skip_reason}) + "\n")
                        skip_counts[reason_category(result.skip_reason)] += 1
                        continue
                    reencoded.update(result.reencoded)
                    entries = sample_entries(num_samples, result.data, entry.label)
                    writer.add(num_samples, sample_key(num_samples), entries)
                    names.write(encode_sample_name(entry.name or entry.path) + "\n")  # line i: sample i
                    num_samples += 1
            shards = writer.close()
            os.replace(names_tmp, out / SAMPLE_NAMES_FILE)
        except BaseException:
            writer.abort()
            names_tmp.unlink(missing_ok=True)
            raise
        finally:
            progress.close()

        class_names = source.classes
        if class_names is None and source.labelled:
            # A list numbering its classes: name class i "i", for every i up to the largest label in the list
            # (skipped files included), so that len(classes) is the number of outputs a classifier needs.
            class_names = [str(i) for i in range(max_label + 1)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_samples": num_samples,
            "labelled": source.labelled,
            "classes": class_names,
            "shards": shards,
            SAMPLE_NAMES_KEY: SAMPLE_NAMES_FILE,
            "num_skipped": sum(skip_counts.values()),
            "skipped_by_reason": dict(sorted(skip_counts.items())),
            "reencoded": dict(sorted(reencoded.items())),
            "options": {
                "shard_size": shard_size,
                "max_side": max_side,
                "max_pixels": max_pixels,
                "jpeg_quality": options.jpeg_quality,
                "prefix": prefix,
                "workers": workers,
            },
            "source": source.description,
        }
        skipped.seek(0)
        write_manifest(out, manifest, (json.loads(line) for line in skipped))
    return read_manifest(out)


def _prepare_output(out: Path, input_root: Path | None) -> None:
    if input_root is not None and out.resolve().is_relative_to(input_root.resolve()):
        raise ValueError(f"--output {out} lies inside --input {input_root}: it would be read as a class folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} exists and is not a folder")
    if out.is_dir():
        names = sorted(os.listdir(out))
        if names:
            raise OutputNotEmptyError(_not_empty_message(out, names))
    out.mkdir(parents=True, exist_ok=True)


def _not_empty_message(out: Path, names: list[str]) -> str:
    finished = MANIFEST_NAME in names
    what = "a finished shard set" if finished else "no manifest.json: an interrupted run or other files"
    message = (
        f"output folder {out} is not empty ({len(names)} entries, {what}). make_shards refuses to overwrite "
        f"or append to it: remove the folder or choose another --output."
    )
    stale = [n for n in names if n.endswith(".tmp")]
    if stale:
        message += f" It holds {len(stale)} stale *.tmp file(s) from a crashed run, e.g. {stale[0]}."
    if finished:
        message += f" To check it instead: tools/make_shards.py --verify {out}"
    return message
