"""Make WebDataset shards (+ DALI index files + manifest.json) from an image folder tree or a list of image paths.

    python tools/make_shards.py --input SRC --output OUT [--workers N] [--shard-size BYTES] [--max-side PX]
    python tools/make_shards.py --input VAL --labels LABELS --classes TRAIN_SHARDS --output OUT
    python tools/make_shards.py --input SRC --output OUT --format beton [--compress-probability P] [...]
    python tools/make_shards.py --verify OUT

Python API: build_shards(src, out, workers=1, ...) -> manifest dict; verify_shards(out) -> VerifyReport.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from pirl_trainer.tools.sharding.beton import build_beton, manifest_format, verify_beton
from pirl_trainer.tools.sharding.build import DEFAULT_PREFIX, DEFAULT_SHARD_SIZE, OutputNotEmptyError, build_shards
from pirl_trainer.tools.sharding.image_check import DEFAULT_MAX_PIXELS, JPEG_QUALITY
from pirl_trainer.tools.sharding.verify import VerifyReport, verify_shards

__all__ = ["build_shards", "build_beton", "verify_shards", "verify_beton", "VerifyReport", "OutputNotEmptyError",
           "main"]

_SIZE = re.compile(r"(?i)\s*([0-9]+)\s*(|k|m|g|kb|mb|gb|kib|mib|gib)\s*")
_UNITS = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip

DESCRIPTION = f"""\
Make WebDataset shards from an image folder tree, a list of image paths, or a flat folder and its labels file.

Input (--input):
  a folder root/<class>/<images>: class index = sorted class-folder order (torchvision ImageFolder), files in
    ImageFolder order; every file is tried, whatever its extension;
  or a text file with one image path per line and an optional TAB + label; relative paths are resolved against
    the list file's folder. The first label decides: a number makes every label a class number (class i is named
    "i", for i up to the largest label); a name (path<TAB>n01440764) makes every label a class name (class index
    = the sorted names, as ImageFolder's);
  or, with --labels FILE, a flat folder of images whose classes FILE gives: Kaggle's LOC_val_solution.csv
    (header ImageId,PredictionString; the first token of the prediction string is the class) or lines
    "file<TAB>class name". A line names a file by its name or its stem (ILSVRC2012_val_00000001 for
    ILSVRC2012_val_00000001.JPEG); files are read in sorted name order. Folder and labels must match exactly:
    a listed image without a file, and a file that no line labels, are errors naming the first one (an
    evaluation set is exactly its listed images, and a stray file means a wrong folder or labels file; move
    such files out). Class index = --classes, or else the sorted set of the labels' class names.

Class index (--classes SRC): label the input with another set's class index, so that both sets' labels mean
  the same classes: SRC is a shard folder of this tool (its manifest.json "classes") or a text file of class
  names, one a line, in index order (from Kaggle's LOC_synset_mapping.txt: cut -d' ' -f1 LOC_synset_mapping.txt).
  Class folders are mapped by name (a split may lack classes; the manifest still lists the whole index), list
  and --labels class names are looked up. A name that is not in the index is an error naming it.
  ImageNet (Kaggle's layout):
    make_shards.py --input ILSVRC/Data/CLS-LOC/train --output shards/train
    make_shards.py --input ILSVRC/Data/CLS-LOC/val --labels LOC_val_solution.csv --classes shards/train \\
        --output shards/val
  Every error about labels or classes is raised before anything is written.

Output (--output, must be new or empty): <prefix>-000000.tar, ... each with a DALI index <prefix>-000000.idx
  (wds2idx format), sample_names.txt (line i: sample i's path relative to --input, or its list entry; what
  data.subset matches image names against) and manifest.json. Each sample: <key>.jpg, <key>.idx (int64 LE global
  index 0..N-1 in input order over kept files, key = %09d of it), and when labelled <key>.cls (ASCII) and
  <key>.label (int64 LE).

Images: each is fully decoded once in a worker. RGB or greyscale JPEGs keep their bytes; anything else that
  decodes (CMYK, PNG, GIF, palette, alpha on white, 16-bit) is re-encoded as an RGB JPEG, quality {JPEG_QUALITY}.
  EXIF orientation: images are stored upright with no orientation tag (a JPEG with orientation 2-8 is rotated
  and re-encoded), because DALI's decoder applies EXIF orientation while Pillow and torchvision ignore it.
  Bad files (empty, truncated, not an image, HTML pages, decompression bombs, unreadable) are skipped and listed
  with their reason in manifest.json "skipped"; the run goes on.

--format beton: OUT/dataset.beton (FFCV; fields image, index, label) + manifest.json, for data.backend=ffcv.
  --input may also be a shard folder of this tool (converted as stored, every idx kept, after --verify passes).
  The images go through the same checks first (as temporary shards in OUT/webdataset.tmp, removed at the end).
  --compress-probability P stores a share 1-P of the images as raw RGB pixels (FFCV's "proportion" mode:
  no decoding when loading, ~10x the bytes; which ones is drawn from the idx). Needs ffcv (pip install -e ".[ffcv]").

A second run into a non-empty --output REFUSES (exit status 2) and names the folder, mentioning stale *.tmp
  files of a crashed run; it never appends or overwrites. Shards are written as *.tmp and renamed when complete;
  manifest.json is written last.

Exit status: 0 done, 1 nothing kept / verification failed, 2 bad arguments or refused output.
"""


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes such as 268435456, 256MiB or 250MB")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_shards.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", metavar="SRC",
                        help="image folder root/<class>/<images>, a list file, or a flat image folder with --labels")
    parser.add_argument("--output", metavar="OUT", help="new or empty folder for the shards")
    parser.add_argument("--labels", metavar="FILE",
                        help="classes of the images of a flat --input folder: Kaggle's LOC_val_solution.csv or "
                        "file<TAB>class lines")
    parser.add_argument("--classes", metavar="SRC",
                        help="class index to label with: a shard folder (its manifest's classes) or a file of names, "
                        "one a line (default: the input's own, sorted)")
    parser.add_argument("--workers", type=int, metavar="N", default=os.cpu_count(),
                        help="decoding processes; 0 decodes in the main process (default: %(default)s, the CPU count)")
    parser.add_argument("--shard-size", type=parse_size, metavar="BYTES", default=DEFAULT_SHARD_SIZE,
                        help="largest shard file in bytes; K/M/G = 1e3.., KiB/MiB/GiB = 2^10.. (default: 256MiB)")
    parser.add_argument("--max-side", type=positive_int, metavar="PX", default=None,
                        help="re-encode images whose longer side exceeds PX down to PX, as FFCV's writer does "
                        "(default: off)")
    parser.add_argument("--max-pixels", type=positive_int, metavar="PIXELS", default=DEFAULT_MAX_PIXELS,
                        help="skip images whose header claims more pixels, before decoding (default: %(default)s, "
                        "Pillow's own limit)")
    parser.add_argument("--jpeg-quality", type=int, metavar="Q", default=None,
                        help=f"quality of re-encoded images, 1-100 (default: {JPEG_QUALITY})")
    parser.add_argument("--format", choices=("webdataset", "beton"), default="webdataset",
                        help="webdataset: tar shards (every backend but ffcv); beton: one FFCV file (default: "
                        "%(default)s)")
    parser.add_argument("--compress-probability", type=float, metavar="P", default=None,
                        help="--format beton: share of images stored as JPEG, the rest as raw pixels (default: 1)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="shard file name prefix (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", metavar="OUT",
                        help="instead of making shards, re-read OUT and check every count against its manifest")
    args = parser.parse_args(argv)
    if args.verify is None and (args.input is None or args.output is None):
        parser.error("--input and --output are required (or --verify OUT)")
    if args.verify is not None and any(a is not None for a in (args.input, args.output, args.labels, args.classes)):
        parser.error("--verify takes no --input/--output/--labels/--classes")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.format != "beton" and args.compress_probability is not None:
        parser.error("--compress-probability applies to --format beton only")
    if args.compress_probability is not None and not 0.0 <= args.compress_probability <= 1.0:
        parser.error("--compress-probability must be in [0, 1]")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be in 1..100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        return _verify(args.verify)
    start = time.perf_counter()
    common = dict(workers=args.workers, shard_size=args.shard_size, max_side=args.max_side,
                  max_pixels=args.max_pixels, show_progress=not args.no_progress, labels=args.labels,
                  classes=args.classes)
    try:
        if args.format == "beton":
            manifest = build_beton(args.input, args.output, jpeg_quality=args.jpeg_quality, **common,
                                   compress_probability=1.0 if args.compress_probability is None
                                   else args.compress_probability)
        else:
            manifest = build_shards(args.input, args.output, prefix=args.prefix, **common,
                                    jpeg_quality=JPEG_QUALITY if args.jpeg_quality is None else args.jpeg_quality)
    except (OutputNotEmptyError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished output: say so; no manifest claims anything
        print(f"make_shards: error: cannot write {args.output}: {e.strerror or e} ({e.filename or 'output'}); "
              "no manifest.json was written, so the folder is not taken for shards; free space or choose another "
              "--output, empty it, and run again", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    for reason, count in manifest["skipped_by_reason"].items():
        print(f"  skipped {count}: {reason}", file=sys.stderr)
    if manifest["num_skipped"]:
        print(f"  (each skipped file and its reason: {args.output}/manifest.json \"skipped\")", file=sys.stderr)
    files = [manifest["beton"]] if "beton" in manifest else manifest["shards"]
    total_mb = sum(s["bytes"] for s in files) / 1e6
    what = "1 .beton file" if "beton" in manifest else f"{len(files)} shards"
    kept = manifest["num_samples"]
    print(
        f"kept {kept}, skipped {manifest['num_skipped']} ({what}, {total_mb:.1f} MB) "
        f"in {elapsed:.1f} s ({(kept + manifest['num_skipped']) / elapsed:.1f} files/s)"
    )
    if kept == 0:
        print("make_shards: error: no image was kept", file=sys.stderr)
        return 1
    return 0


def _verify(shard_dir: str) -> int:
    report = verify_beton(shard_dir) if manifest_format(shard_dir) == "beton" else verify_shards(shard_dir)
    for problem in report.problems:
        print(f"verify: {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED with {len(report.problems)} problem(s)"
    print(f"verify {shard_dir}: {report.shards} shards, {report.samples} samples: {status}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
