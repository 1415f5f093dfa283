"""make_shards --format beton: one FFCV dataset file (`dataset.beton`) + manifest.json, and its --verify.

How it is made: the input goes through the WebDataset path first (tools/sharding/build.py, into a temporary
`webdataset.tmp/` folder inside OUT), so the checks, skip reasons, global `idx`, labels, re-encoding and the
manifest's bookkeeping are the same code; the verified shards are then converted with FFCV's `DatasetWriter` and
removed. An existing shard folder of this tool is converted directly, after `--verify` passes on it, keeping every
`idx` (the manifest's `source` then records the shards' folder and the sha256 of their manifest.json; converted to
`DIR-beton` beside `DIR`, the FFCV backend also accepts `DIR` itself). Costs: the shards' bytes on disk for the
time of the conversion, and one more sequential read.

The .beton holds, per sample (FFCV sample id = global idx):
- `image`: an FFCV `RGBImageField` (any FFCV pipeline reads it) holding the shard's JPEG bytes as they are (mode
  `jpg`, height and width from the JPEG header), or, for a `1 - compress_probability` share of the samples (FFCV's
  `proportion` write mode; drawn from the idx, so the same input always gives the same choice), the decoded
  RGB pixels (mode `raw`: no decoding when loading, ~10x the bytes). FFCV's own `RGBImageField.encode` only takes
  pixels and re-encodes them with OpenCV, so this writer's field instance encodes stored bytes instead;
- `index`: `IntField`, the global idx (equal to the sample id; --verify and the loader check it);
- `label`: `IntField`, only when the input is labelled.
The manifest has the WebDataset manifest's keys (`shards` is empty) plus `format: "beton"` and `beton` (file,
samples, bytes, sha256, page_size, `stored` counts per mode); the shards' sample-names file is copied beside it.
The .beton's byte layout depends on the order in which the writer's processes claim pages (with more than one
worker); its samples do not.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import shutil
from pathlib import Path

import numpy as np
import simplejpeg

from pirl_trainer.pipelines.errors import FFCV_INSTALL_HINT
from pirl_trainer.pipelines.shard_format import (BETON_FORMAT, FORMAT_VERSION, MANIFEST_NAME, is_beton,
                                                 read_manifest, sample_key, sample_names_file, write_manifest)
from pirl_trainer.pipelines.shard_index import file_sha256
from pirl_trainer.tools.sharding.build import _prepare_output, build_shards
from pirl_trainer.tools.sharding.sources import open_source
from pirl_trainer.tools.sharding.verify import (JPEG_SOI, VerifyReport, folder_problems, manifest_or_problem,
                                                verify_shards)

BETON_NAME = "dataset.beton"
TMP_SHARDS = "webdataset.tmp"  # the intermediate shard folder inside OUT, removed after the conversion
ERRORS_NAME = "errors.tmp"  # conversion errors reported by FFCV's writer processes
IMAGE, INDEX, LABEL = "image", "index", "label"
MODE_JPG, MODE_RAW = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES
# FFCV's writer default page (4 x 2 MiB); a page must hold a sample's largest allocation (a raw image can be more).
MIN_PAGE_SIZE = 8 * 2**20



def is_shard_folder(path: Path) -> bool:
    """A folder written by make_shards (either format): it has a manifest.json."""
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def stored_raw(idx: int, compress_probability: float) -> bool:
    """Whether sample idx is stored as raw pixels: a draw from the idx alone (same input, same file)."""
    if compress_probability >= 1.0:
        return False
    return random.Random(idx).random() >= compress_probability


def build_beton(
    src: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 1,
    *,
    compress_probability: float = 1.0,
    **shard_options,
) -> dict:
    """Make OUT/dataset.beton + OUT/manifest.json from an image folder, a list file or a shard folder of this tool.

    workers: decoding processes (as build_shards) and FFCV writer processes (at least 1). shard_options: build_shards'
    keyword arguments (shard_size, max_side, show_progress, max_pixels, jpeg_quality, labels, classes, prefix) for
    the temporary shards; None stands for build_shards' default. Returns the manifest.
    """
    shard_options = {name: value for name, value in shard_options.items() if value is not None}
    inspect.signature(build_shards).bind(src, out, workers, **shard_options)  # a misspelt option fails before any work
    _import_ffcv()
    src, out = Path(src), Path(out)
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    from_shards = is_shard_folder(src)
    if from_shards and shard_options.keys() & {"max_side", "jpeg_quality"}:
        raise ValueError(f"--input {src} is a shard folder: its images are converted as stored, so --max-side and "
                         "--jpeg-quality do not apply (remake the shards from the images to change them)")
    labels, classes = shard_options.get("labels"), shard_options.get("classes")
    if from_shards and (labels is not None or classes is not None):
        raise ValueError(f"--input {src} is a shard folder: its labels are converted as stored, so --labels and "
                         "--classes do not apply (remake the shards from the images to change them)")
    if not from_shards:
        open_source(src, labels=labels, classes=classes)  # labels that do not fit: refused before OUT is made
    _prepare_output(out, src if src.is_dir() and not from_shards else None)
    if from_shards:
        source_manifest = read_manifest(src)
        if is_beton(source_manifest):
            raise ValueError(f"--input {src} already holds a .beton")
        report = verify_shards(src)
        if not report.ok:
            raise ValueError(f"--input {src}: the shards fail verification ({len(report.problems)} problems), "
                             f"e.g. {report.problems[0]}")
        source = {"kind": "webdataset", "path": str(src.resolve()),
                  "manifest_sha256": file_sha256(src / MANIFEST_NAME)}  # the FFCV loader checks a DIR-beton with it
        return _convert(src, out, source_manifest, source, workers=workers,
                        compress_probability=compress_probability)
    tmp = out / TMP_SHARDS
    manifest = build_shards(src, tmp, workers=workers, **shard_options)
    try:
        return _convert(tmp, out, manifest, manifest["source"], workers=workers,
                        compress_probability=compress_probability)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import_ffcv() -> None:
    try:
        import ffcv.writer  # noqa: F401  (its import also checks numba and OpenCV)
    except ImportError as err:
        raise ValueError(f"--format beton needs FFCV: {FFCV_INSTALL_HINT} ({err})") from err


def _convert(shard_dir: Path, out: Path, shard_manifest: dict, source: dict, *, workers: int,
             compress_probability: float) -> dict:
    """Shards (verified) -> OUT/dataset.beton through FFCV's DatasetWriter; writes and returns the manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pirl_trainer.pipelines.shard_index import build_sample_table

    table = build_sample_table(shard_dir)
    n = table.num_samples
    if n == 0:
        raise ValueError(f"no image was kept, nothing to write (skipped: {shard_manifest['skipped_by_reason']})")
    raw = np.array([stored_raw(i, compress_probability) for i in range(n)], dtype=bool)
    page_size = _page_size(table, raw)
    image_field = RGBImageField(write_mode="jpg")
    image_field.encode = _encode_stored_image  # instance attribute: the file keeps RGBImageField's type id
    fields = {IMAGE: image_field, INDEX: IntField()}
    if table.labelled:
        fields[LABEL] = IntField()
    beton_tmp = out / (BETON_NAME + ".tmp")
    errors = out / ERRORS_NAME
    errors.unlink(missing_ok=True)
    dataset = _StoredImages(table, raw, str(errors))
    try:
        writer = DatasetWriter(str(beton_tmp), fields, page_size=page_size, num_workers=max(1, workers))
        with _quiet_writer():
            writer.from_indexed_dataset(dataset, chunksize=64)
        if errors.exists():
            lines = errors.read_text().splitlines()
            raise ValueError(f"{shard_dir}: {len(lines)} sample(s) could not be converted, e.g. {lines[0]}")
        digest, size = file_sha256(beton_tmp), beton_tmp.stat().st_size
        os.replace(beton_tmp, out / BETON_NAME)
    except BaseException:
        beton_tmp.unlink(missing_ok=True)
        raise
    finally:
        errors.unlink(missing_ok=True)

    names = sample_names_file(shard_dir, shard_manifest)
    if names is not None:  # the same idx, so the same line per sample; the manifest keeps its key
        shutil.copyfile(names, out / names.name)
    manifest = {key: value for key, value in shard_manifest.items() if key != "skipped"}
    manifest.update({
        "format_version": FORMAT_VERSION,
        "format": BETON_FORMAT,
        "shards": [],
        "beton": {"file": BETON_NAME, "samples": n, "bytes": size, "sha256": digest, "page_size": page_size,
                  "stored": {"jpg": int(n - raw.sum()), "raw": int(raw.sum())},
                  "fields": {name: type(field).__name__ for name, field in fields.items()}},
        "options": {**shard_manifest.get("options", {}), "format": BETON_FORMAT,
                    "compress_probability": compress_probability, "workers": workers},
        "source": source,
    })
    write_manifest(out, manifest, iter(shard_manifest["skipped"]))
    return read_manifest(out)


def _page_size(table, raw: np.ndarray) -> int:
    """FFCV's page size: a power of two that holds the largest sample (a JPEG, or h*w*3 bytes of raw pixels)."""
    largest = int(table.jpg_size[~raw].max()) if (~raw).any() else 0
    if raw.any():
        from pirl_trainer.pipelines.shard_index import ShardReader

        reader = ShardReader(table)
        try:
            for i in np.flatnonzero(raw):
                height, width, _, _ = simplejpeg.decode_jpeg_header(bytes(reader.read(int(i)).jpg))
                largest = max(largest, 3 * height * width)
        finally:
            reader.close()
    size = MIN_PAGE_SIZE
    while size < largest:
        size *= 2
    return size


def _encode_stored_image(destination, value, malloc) -> None:
    """RGBImageField metadata (mode, height, width, data_ptr) for bytes the writer already has."""
    mode, height, width, payload = value
    destination["mode"], destination["height"], destination["width"] = mode, height, width
    destination["data_ptr"], storage = malloc(payload.nbytes)
    storage[:] = payload


class _StoredImages:
    """What FFCV's writer processes read: sample i of the shards as (image, index[, label]).

    FFCV's writer waits forever for a sample whose process raised (or died), so nothing here raises: a failure is
    appended to the errors file (one line, O_APPEND) and a 1x1 placeholder written; the conversion then fails as a
    whole. Images were fully decoded when the shards were made, so only I/O errors are expected here.
    """

    def __init__(self, table, raw: np.ndarray, errors_path: str):
        from pirl_trainer.pipelines.shard_index import ShardReader

        self.table, self.raw, self.errors_path = table, raw, errors_path
        self.reader = ShardReader(table)  # reopens its files in each writer process

    def __len__(self) -> int:
        return self.table.num_samples

    def __getitem__(self, i: int) -> tuple:
        label = 0
        try:
            sample = self.reader.read(i)
            label = sample.label
            image = self._image(bytes(sample.jpg), bool(self.raw[i]))
        except Exception as err:  # noqa: BLE001 - reported through the errors file, see the class docstring
            where = f"{self.table.tar_paths[int(self.table.shard[i])]} sample {sample_key(i)}"
            with open(self.errors_path, "a", encoding="utf-8") as f:
                f.write(f"{where}: {type(err).__name__}: {err}\n")
            image = (MODE_RAW, 1, 1, np.zeros(3, dtype=np.uint8))
        return (image, i, label) if self.table.labelled else (image, i)

    @staticmethod
    def _image(jpg: bytes, raw: bool) -> tuple:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpg)  # as pipelines/views.py reads it
        if not raw:
            return MODE_JPG, height, width, np.frombuffer(jpg, dtype=np.uint8)
        # torchvision: imported in the writer processes only when needed
        from pirl_trainer.pipelines.views import decode

        pixels = decode(jpg).permute(1, 2, 0).numpy()  # (H, W, 3): the pixels the reference backend decodes
        return MODE_RAW, height, width, np.ascontiguousarray(pixels).reshape(-1)


class _quiet_writer:
    """FFCV's DatasetWriter always draws a tqdm bar; make_shards draws its own while checking images."""

    def __enter__(self):
        import ffcv.writer
        from tqdm import tqdm

        self._saved = ffcv.writer.tqdm
        ffcv.writer.tqdm = functools.partial(tqdm, disable=True)

    def __exit__(self, *exc):
        import ffcv.writer

        ffcv.writer.tqdm = self._saved


# --------------------------------------------------------------------------------------------------- reading back


class BetonSample:
    """One sample as stored: the fields and the stored image bytes (a view into the file's memory map)."""

    __slots__ = ("index", "label", "mode", "height", "width", "data")

    def __init__(self, index, label, mode, height, width, data):
        self.index, self.label, self.mode, self.height, self.width, self.data = index, label, mode, height, width, data


def read_beton(path: str | os.PathLike):
    """Every sample of a .beton of this tool, in sample-id order (BetonSample). Raises ValueError on a file
    whose fields or allocations do not have this tool's layout."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    reader = Reader(str(path))
    names = reader.field_names
    expected = {IMAGE: RGBImageField, INDEX: IntField, LABEL: IntField}
    for name, handler in reader.handlers.items():
        if name not in expected or not isinstance(handler, expected[name]):
            raise ValueError(f"{path}: unexpected field {name!r} ({type(handler).__name__})")
    for name in (IMAGE, INDEX):
        if name not in names:
            raise ValueError(f"{path}: no {name!r} field")
    meta = reader.metadata
    image = meta[f"f{names.index(IMAGE)}"]
    index = meta[f"f{names.index(INDEX)}"]
    label = meta[f"f{names.index(LABEL)}"] if LABEL in names else None
    alloc = np.sort(reader.alloc_table, order="ptr")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for i in range(reader.num_samples):
        ptr = image["data_ptr"][i]
        k = int(np.searchsorted(alloc["ptr"], ptr))
        if k == len(alloc) or alloc["ptr"][k] != ptr or alloc["sample_id"][k] != i:
            raise ValueError(f"{path}: sample {i}: its image has no allocation of its own")
        size = int(alloc["size"][k])
        yield BetonSample(int(index[i]), None if label is None else int(label[i]), int(image["mode"][i]),
                          int(image["height"][i]), int(image["width"][i]), data[ptr:ptr + size])


def beton_path(shard_dir: str | os.PathLike, manifest: dict) -> Path:
    return Path(shard_dir) / manifest["beton"]["file"]


def verify_beton(shard_dir: str | os.PathLike) -> VerifyReport:
    """make_shards --verify on a .beton folder: size and sha256, sample count, fields, index == sample id and
    contiguous, labels within the classes, each image's allocation, JPEG markers and header size (or the raw
    size), the manifest's totals, and no stray or *.tmp files."""
    shard_dir = Path(shard_dir)
    report = VerifyReport()
    manifest = manifest_or_problem(shard_dir, report)
    if manifest is None:
        return report
    problems = report.problems
    info = manifest.get("beton") or {}
    path = shard_dir / info.get("file", BETON_NAME)
    report.shards = 1
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return report
    if path.stat().st_size != info.get("bytes"):
        problems.append(f"{path.name}: {path.stat().st_size} bytes, manifest says {info.get('bytes')}")
    if file_sha256(path) != info.get("sha256"):
        problems.append(f"{path.name}: sha256 differs from the manifest's: the file was changed after it was written")
    try:
        _import_ffcv()
    except ValueError as err:
        problems.append(str(err))
        return report
    num_classes = len(manifest["classes"]) if manifest["classes"] is not None else None
    stored = {"jpg": 0, "raw": 0}
    try:
        for i, sample in enumerate(read_beton(path)):
            report.samples += 1
            where = f"{path.name}: sample {i}"
            if sample.index != i:
                problems.append(f"{where}: index {sample.index}, expected {i} (indexes must run 0..N-1 in order)")
            if (sample.label is not None) != manifest["labelled"]:
                problems.append(f"{where}: label field {'present' if sample.label is not None else 'missing'}, "
                                f"manifest says labelled={manifest['labelled']}")
            elif num_classes is not None and not 0 <= sample.label < num_classes:
                problems.append(f"{where}: label {sample.label} outside the {num_classes} manifest classes")
            if sample.mode == MODE_JPG:
                stored["jpg"] += 1
                _check_jpeg(where, sample, problems)
            elif sample.mode == MODE_RAW:
                stored["raw"] += 1
                if len(sample.data) != 3 * sample.height * sample.width:
                    problems.append(f"{where}: {len(sample.data)} raw bytes for {sample.width}x{sample.height} px")
            else:
                problems.append(f"{where}: image mode {sample.mode}, expected jpg (0) or raw (1)")
            if len(problems) > 100:
                problems.append("more problems not listed")
                break
    except (ValueError, OSError, AssertionError) as err:
        problems.append(f"{path.name}: unreadable: {type(err).__name__}: {err}")
    if report.samples != manifest["num_samples"] or info.get("samples") != manifest["num_samples"]:
        problems.append(f"manifest num_samples {manifest['num_samples']} (beton.samples {info.get('samples')}), "
                        f"{path.name} holds {report.samples}")
    if info.get("stored") not in (None, stored) and not problems:
        problems.append(f"manifest beton.stored {info.get('stored')}, {path.name} holds {stored}")
    problems += folder_problems(shard_dir, manifest, {path.name})
    return report


def _check_jpeg(where: str, sample: BetonSample, problems: list[str]) -> None:
    data = bytes(sample.data)
    if not data.startswith(JPEG_SOI):
        problems.append(f"{where}: image does not start with a JPEG start-of-image marker")
        return
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError) as err:
        problems.append(f"{where}: unreadable JPEG header: {err}")
        return
    if (height, width) != (sample.height, sample.width):
        problems.append(f"{where}: JPEG is {width}x{height} px, the field says {sample.width}x{sample.height}")


def manifest_format(shard_dir: str | os.PathLike) -> str:
    """'beton' or 'webdataset', from OUT/manifest.json (a missing or invalid manifest reads as webdataset,
    whose verify reports it)."""
    try:
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError):
        return "webdataset"
    return BETON_FORMAT if is_beton(manifest) else "webdataset"
