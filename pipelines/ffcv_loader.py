"""The FFCV backend: a .beton read by an FFCV `Loader`, one JPEG decode per sample cutting both PIRL views.

Data: `python tools/make_shards.py --input SRC --output DIR --format beton` (SRC: images, a list, or shards of this
tool) writes DIR/dataset.beton + DIR/manifest.json. `shard_dir` is that folder, the .beton file itself (without a
manifest, classes are named "0".."max label"), or a WebDataset shard folder SHARDS converted to SHARDS-beton beside
it (so one data.shards / --shards serves every backend); other shard folders are refused with the command.

Per batch, inside FFCV's loader thread (its pipeline for the `image` field):
1. `_LocateImages` (FFCV's jitted decoder stage): where each stored image lies in FFCV's memory (the memory-mapped
   file with os_cache=True, FFCV's own page cache otherwise), its size, height, width and mode; nothing is decoded.
2. `_CutViews` (a Python stage, called with the batch's sample ids = global indexes): draws each sample's
   geometry with pipelines/geometry.py from a generator seeded by (seed, epoch, index), exactly as the reference
   backend, then runs one numba kernel over the batch (threads = num_workers, GIL released) that decodes each
   JPEG once (libjpeg-turbo through FFCV's `imdecode`, at 1/2-1/8 scale inside the IDCT where the recipe's
   reduced_decoding allows, as the reference) and cuts both views from that one image: the image view and It's
   crop are resized with FFCV's `resize` (OpenCV INTER_AREA), the nine patches copied out of the crop.
   Against two decodes (two FFCV pipelines reading the field, one per view, same draws and resizes), on one
   thread: 3.38 against 4.79 ms a sample on imagenet-sample photos (1.42x), 1.06 against 1.57 ms on the same
   photos capped at 320 px (docs/pipelines.md, "The FFCV backend").
The epoch reaches the stage as an attribute set before each epoch's FFCV iterator starts; the previous epoch's
iterator is stopped first (its thread joined), so no batch of one epoch is cut with another epoch's draws. The
indexes come from FFCV itself (the sample ids of the batch, checked against the .beton's `index` field).

Order: pipelines/sampler.py, as every backend (exactly once per epoch over the ranks, equal steps, a full shuffle,
exact resume from a step). FFCV is driven with `indices=` = this rank's remaining batches of the epoch, in order,
with SEQUENTIAL traversal; FFCV cuts them into batches of B, and a last batch of B + 1 samples (sampler.py) comes
out of FFCV as B and 1 and is joined here. FFCV's `distributed=True` (DistributedSampler: pads by repeating, drops
each rank's last partial batch) is not used.

Batches: views are fresh arrays for every batch (not FFCV's reused ring buffers), channels-last like the reference
backend's, so a batch may be kept past the next step. FFCV sets torch's and numba's thread counts to num_workers
when it starts; this module restores the caller's settings. One iteration at a time per loader: starting a new
one stops the previous one.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from numba import types

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.epoch_loader import EpochLoader
from pirl_trainer.pipelines.errors import FFCV_INSTALL_HINT, BackendUnavailable
from pirl_trainer.pipelines.geometry import dct_reduction, draw_sample_geometry
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.loader_front import open_loader, resolve_pin_memory
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.common.rng import PURPOSE_SAMPLE, generator_for
from pirl_trainer.pipelines.shard_index import MANIFEST_NAME, read_manifest
from pirl_trainer.pipelines.views import check_pixels, eval_size

_threads = torch.get_num_threads(), numba.get_num_threads()  # importing ffcv sets both to 1 (Compiler)
try:
    from ffcv.fields.basics import IntDecoder
    from ffcv.libffcv import ctypes_imdecode, ctypes_resize
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation
    from ffcv.reader import Reader
    from ffcv.utils import cast_int_to_byte_ptr
except ImportError as _err:  # the backend is an optional extra; make_loader says how to install it
    _FFCV_IMPORT_ERROR: ImportError | None = _err
    Operation = object
else:
    _FFCV_IMPORT_ERROR = None
    # libffcv's C functions under names of our own, called from the kernel as external functions: unlike ctypes
    # function objects these let numba cache the compiled kernel (cache=True) between processes.
    llvm.add_symbol("pirl_ffcv_imdecode", ctypes.cast(ctypes_imdecode, ctypes.c_void_p).value)
    llvm.add_symbol("pirl_ffcv_resize", ctypes.cast(ctypes_resize, ctypes.c_void_p).value)
finally:
    torch.set_num_threads(_threads[0])
    numba.set_num_threads(_threads[1])

BETON_SUFFIX = ".beton"
CONVERTED_SUFFIX = "-beton"  # DIR-beton: the conversion of the shard folder DIR, found from DIR
IMAGE_FIELD, INDEX_FIELD, LABEL_FIELD = "image", "index", "label"
MODE_JPG = 0  # ffcv.fields.rgb_image.IMAGE_MODES; 1 is raw pixels
BATCHES_AHEAD = 3  # FFCV's default: batches prepared ahead of the consumer
POLL_S = 1.0  # how often a wait for FFCV's thread checks that the thread is still alive

# Kinds of view the kernel cuts.
KIND_JIGSAW, KIND_SECOND_IMAGE, KIND_EVAL = 0, 1, 2  # KIND_SECOND_IMAGE: the "rotation" and "image" views
# Columns of the per-sample plan the kernel reads (int32): boxes are (top, left, height, width) in the decoded
# image's pixels; for eval, IMAGE_BOX holds (resized height, resized width, crop top, crop left).
SCALE, IMAGE_BOX, IMAGE_FLIP, JIGSAW_BOX, JIGSAW_FLIP, ORIGINS = 0, 1, 5, 6, 10, 11
# Kernel status per sample: SKIP is set before the kernel runs (pipelines/jpeg_check.py found the JPEG corrupt).
OK, DECODE_FAILED, RAW_SIZE, SKIP = 0, 1, 2, 3


def make_loader(shard_dir: str, recipe: PirlRecipe, **kwargs) -> FfcvLoader:
    """FFCV-backend loader over a .beton of tools/make_shards.py (--format beton); the reference backend's interface.

    kwargs: the arguments of every backend (pipelines/loader_front.py LoaderArgs) and this backend's own
    (_own_options). num_workers: threads cutting views (FFCV's num_workers; 0 counts as 1, FFCV always works in its
    own thread). os_cache=True reads through the OS page cache (memory-mapped file, shared by the ranks of a
    machine); False: FFCV's process cache, which loads the pages an epoch needs into this process.
    pin_memory=None pins when CUDA is available.
    """
    return open_loader("ffcv", shard_dir, recipe, kwargs, options=_own_options, loader=_loader,
                       read_samples=resolve_beton, require=_require_ffcv)


def _require_ffcv() -> None:
    if _FFCV_IMPORT_ERROR is not None:
        raise BackendUnavailable(f"{FFCV_INSTALL_HINT} ({_FFCV_IMPORT_ERROR})") from _FFCV_IMPORT_ERROR


def _own_options(*, pin_memory: bool | None = None, os_cache: bool = True) -> dict:
    """The FFCV backend's own make_loader options, as FfcvLoader's keyword arguments."""
    return {"pin_memory": resolve_pin_memory(pin_memory), "os_cache": os_cache}


def _loader(found: tuple[Path, dict | None], recipe: PirlRecipe, **kwargs) -> FfcvLoader:
    """FfcvLoader over what resolve_beton found: (the .beton, its manifest or None)."""
    beton, manifest = found
    return FfcvLoader(beton, manifest, recipe, **kwargs)


def resolve_beton(shard_dir: str) -> tuple[Path, dict | None]:
    """(the .beton, its manifest or None) for a folder of make_shards --format beton, a .beton file, or a
    WebDataset shard folder DIR whose conversion DIR-beton (make_shards --input DIR --output DIR-beton --format
    beton) lies beside it, made from DIR's current manifest.json. Any other WebDataset folder: BackendUnavailable
    with that command."""
    path = Path(shard_dir)
    if path.is_file() and path.suffix == BETON_SUFFIX:
        if (path.parent / MANIFEST_NAME).is_file():
            manifest = read_manifest(path.parent)
            if manifest.get("format") == "beton" and manifest["beton"]["file"] == path.name:
                return path, manifest
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"{shard_dir}: no such .beton file or folder")
    manifest = read_manifest(path)
    if manifest.get("format") != "beton":
        converted = Path(f"{path.resolve()}{CONVERTED_SUFFIX}")
        if _converted_from(converted, path):
            return resolve_beton(str(converted))
        raise BackendUnavailable(
            f"{shard_dir} holds WebDataset shards; the FFCV backend reads a .beton. Convert them once (every idx is "
            f"kept): python tools/make_shards.py --input {shard_dir} --output {converted} --format beton"
        )
    beton = path / manifest["beton"]["file"]
    if not beton.is_file():
        raise FileNotFoundError(f"{beton}: listed in {path / MANIFEST_NAME} but missing")
    return beton, manifest


def _converted_from(converted: Path, shards: Path) -> bool:
    """Whether `converted` is a .beton folder made from the shards' current manifest."""
    if not (converted / MANIFEST_NAME).is_file():
        return False
    source = read_manifest(converted).get("source", {})
    digest = hashlib.sha256((shards / MANIFEST_NAME).read_bytes()).hexdigest()
    return source.get("path") == str(shards.resolve()) and source.get("manifest_sha256") == digest


@dataclass(frozen=True)
class BetonTable:
    """What EpochLoader needs to know of the data set (the reference's SampleTable, for a .beton)."""

    num_samples: int
    classes: list[str] | None
    labelled: bool


class FfcvLoader(EpochLoader):
    """One rank's loader: an FFCV Loader over the .beton, driven with self.batches() of every epoch."""

    def __init__(self, beton: Path, manifest: dict | None, recipe: PirlRecipe, *, pin_memory: bool, os_cache: bool,
                 **kwargs):
        self.beton = beton
        self.pin_memory = pin_memory
        self._active = None  # the running FFCV epoch iterator, if any
        self._views = _CutViews(recipe, mode=kwargs["mode"], seed=kwargs["seed"],
                                with_geometry=kwargs["with_geometry"], pin_memory=pin_memory)
        fields = Reader(str(beton)).field_names
        for name in (IMAGE_FIELD, INDEX_FIELD):
            if name not in fields:
                raise ValueError(f"{beton}: no {name!r} field; make it with tools/make_shards.py --format beton")
        labelled = LABEL_FIELD in fields
        pipelines = {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=_LocateImages(), transforms=[self._views]),
                     INDEX_FIELD: [IntDecoder()], **({LABEL_FIELD: [IntDecoder()]} if labelled else {})}
        with _ThreadSettingsKept():
            # No indices= here: FFCV cuts every later order to the length of its first one, all N samples.
            self._ffcv = Loader(str(beton), batch_size=kwargs["batch_size"], num_workers=max(1, kwargs["num_workers"]),
                                os_cache=os_cache, order=OrderOption.SEQUENTIAL, drop_last=False,
                                batches_ahead=BATCHES_AHEAD, pipelines=pipelines)
        self._outputs = list(self._ffcv.pipeline_specs)  # FFCV returns one output per pipeline, in this order
        super().__init__(self._table(manifest, labelled), recipe, **kwargs)

    def _table(self, manifest: dict | None, labelled: bool) -> BetonTable:
        reader = self._ffcv.reader
        n = int(reader.num_samples)
        if manifest is not None:
            if manifest["num_samples"] != n or manifest["labelled"] != labelled:
                raise ValueError(f"{self.beton}: {n} samples (labelled={labelled}), its manifest says "
                                 f"{manifest['num_samples']} (labelled={manifest['labelled']})")
            return BetonTable(n, list(manifest["classes"]) if labelled else None, labelled)
        if not labelled:
            return BetonTable(n, None, False)
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        return BetonTable(n, [str(i) for i in range(int(labels.max()) + 1)], True)

    def sample_labels(self, indexes) -> np.ndarray:
        """(n,) int64 labels of these global sample indexes, from the .beton's metadata table (no page is read)."""
        if not self.labelled:
            raise ValueError(f"{self.beton}: the samples are unlabelled")
        reader = self._ffcv.reader
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        return np.asarray(labels, dtype=np.int64)[np.asarray(indexes, dtype=np.int64)]

    def _set_order(self, order: np.ndarray) -> None:
        # FFCV cuts every order to the length of its first one, all N samples (no indices= at construction), so
        # a rank's epoch always fits.
        self._ffcv.indices = order
        self._ffcv.traversal_order.indices = order  # SEQUENTIAL traversal returns these, in this order

    def _iterate(self, batches):
        return self._batches(self.epoch, batches)

    def sample_location(self, i: int) -> str:
        return f"{self.beton} sample {i:09d}"

    def skip_reason(self, i: int) -> str:
        return self._views.skip_reasons.get(i, "its image could not be decoded")

    def _batches(self, epoch: int, batches: list[np.ndarray]):
        """Runs from the first next(): stops the loader's previous iteration, then starts FFCV's thread."""
        if not batches:
            return
        self.close()
        self._views.epoch = epoch  # no FFCV thread runs now: the previous one was stopped above
        self._set_order(np.concatenate(batches))
        with _ThreadSettingsKept():
            epoch_iterator = iter(self._ffcv)
        self._active = epoch_iterator
        try:
            for expected in batches:
                parts = [self._next(epoch_iterator)]
                while sum(len(v.index) + len(v.skipped) for v in parts) < len(expected):  # B + 1 comes as B, 1
                    parts.append(self._next(epoch_iterator))
                batch = parts[0].batch
                if len(parts) > 1:
                    batch = {k: torch.cat([v.batch[k] for v in parts]) for k in batch}
                    if self.pin_memory:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                skipped = np.concatenate([v.skipped for v in parts])
                if len(skipped):  # corrupt samples were left out (EpochLoader counts them)
                    expected = expected[~np.isin(expected, skipped)]
                if not torch.equal(batch[B.INDEX], torch.from_numpy(expected)):
                    raise RuntimeError(f"{self.beton}: FFCV delivered samples {batch[B.INDEX][:8].tolist()}..., "
                                       f"expected {expected[:8].tolist()}...")
                yield batch
        finally:
            if self._active is epoch_iterator:
                self.close()

    def _next(self, epoch_iterator) -> _Views:
        """The next FFCV batch, its views as a loader-batch dict. Waits on FFCV's queue directly: its own
        __next__ waits forever when its thread has died."""
        if self._active is not epoch_iterator:
            raise RuntimeError("this iteration was stopped: a newer iteration of the same FFCV loader started")
        while True:
            try:
                item = epoch_iterator.output_queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not epoch_iterator.is_alive():
                    raise RuntimeError("FFCV's loader thread ended without delivering a batch (its error is "
                                       "printed above)") from None
        if item is None:
            raise RuntimeError("FFCV's epoch ended before this rank's batches did")
        outputs = dict(zip(self._outputs, item[1]))
        views = outputs[IMAGE_FIELD]
        if isinstance(views, _Failure):
            raise RuntimeError(f"{self.beton}: {views.message}")
        stored = outputs[INDEX_FIELD][:, 0]
        if not np.array_equal(stored, views.ids):
            raise RuntimeError(f"{self.beton}: index field {stored[:8].tolist()}... differs from "
                               f"the sample ids {views.ids[:8].tolist()}...: not a .beton of tools/make_shards.py?")
        batch = views.batch
        batch[B.INDEX] = torch.from_numpy(views.index)
        if self.labelled:  # a copy: FFCV reuses its buffer
            batch[B.LABEL] = torch.from_numpy(outputs[LABEL_FIELD][:, 0][views.kept].astype(np.int64))
        return views

    def close(self) -> None:
        """Stop the running FFCV epoch iterator, if any, and wait for its thread."""
        epoch_iterator, self._active = self._active, None
        if epoch_iterator is None:
            return
        epoch_iterator.terminate_event.set()
        while epoch_iterator.is_alive():  # it may be blocked putting a batch into its full queue
            try:
                while True:
                    epoch_iterator.output_queue.get_nowait()
            except queue.Empty:
                pass
            epoch_iterator.join(timeout=0.05)
        epoch_iterator.close()

    def __del__(self):
        if getattr(self, "_active", None) is not None:
            self.close()


class _ThreadSettingsKept:
    """FFCV's Compiler.set_num_threads sets torch's and numba's thread counts to its num_workers; keep the
    caller's."""

    def __enter__(self):
        self._torch, self._numba = torch.get_num_threads(), numba.get_num_threads()

    def __exit__(self, *exc):
        torch.set_num_threads(self._torch)
        numba.set_num_threads(self._numba)


class _Failure:
    """What _CutViews returns instead of raising: an exception in FFCV's thread would kill it silently."""

    def __init__(self, message: str):
        self.message = message


class _Views:
    """_CutViews' output for one FFCV batch: the loader-batch views of its sound samples, their global indexes,
    and the batch's sample ids and which were kept (the others were corrupt)."""

    def __init__(self, batch: dict, ids: np.ndarray, kept: np.ndarray):
        self.batch, self.ids, self.kept = batch, ids, kept
        self.index, self.skipped = ids[kept], ids[~kept]


class _LocateImages(Operation):
    """The image field's decoder stage, decoding nothing: per sample (address, size, height, width, mode) of its
    stored bytes in FFCV's memory, valid while FFCV runs this batch's pipeline."""

    def declare_state_and_memory(self, previous_state):
        shape, dtype = (5,), np.dtype("<u8")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self):
        mem_read = self.memory_read

        def locate(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                destination[i, 0] = data.ctypes.data
                destination[i, 1] = data.size
                destination[i, 2] = field["height"]
                destination[i, 3] = field["width"]
                destination[i, 4] = field["mode"]
            return destination[:len(batch_indices)]

        return locate


class _CutViews(Operation):
    """Python stage after _LocateImages: draws the batch's geometry, then one kernel decodes and cuts."""

    def __init__(self, recipe: PirlRecipe, *, mode: str, seed: int, with_geometry: bool, pin_memory: bool = False):
        super().__init__()
        self.recipe, self.mode, self.seed, self.with_geometry = recipe, mode, seed, with_geometry
        self.pin_memory = pin_memory
        self.epoch = 0
        r = recipe
        self.kind = KIND_EVAL if mode == "eval" else KIND_SECOND_IMAGE if r.second_image_view else KIND_JIGSAW
        self.tiles = 0 if mode == "eval" else r.view_tiles
        self.tile_size = r.view_tile_size
        self.sample_bytes = 3 * (r.image_size ** 2 + self.tiles * self.tile_size ** 2)
        self.skip_reasons: dict[int, str] = {}  # global index -> why it was skipped (read by the loader)

    def declare_state_and_memory(self, previous_state):
        # No FFCV buffer: every batch gets fresh arrays (FFCV's buffers are reused batches_ahead + 2 batches on).
        return replace(previous_state, jit_mode=False, shape=(self.sample_bytes,), dtype=np.dtype("u1")), None

    def generate_code(self):
        def cut(located, _memory, batch_indices):
            return self.cut(located, batch_indices)

        cut.with_indices = True  # FFCV then passes the batch's sample ids (= global indexes)
        return cut

    def cut(self, located: np.ndarray, indices: np.ndarray):
        try:
            return self._cut(np.asarray(located), np.asarray(indices, dtype=np.int64))
        except Exception:  # noqa: BLE001 - handed to the consumer's thread, which raises it
            return _Failure("cutting the views failed in FFCV's thread:\n" + traceback.format_exc())

    def _cut(self, located: np.ndarray, index: np.ndarray) -> _Views:
        n, r = len(index), self.recipe
        plan = np.zeros((n, ORIGINS + 2 * max(self.tiles, 1)), dtype=np.int32)
        geometry = [] if self.with_geometry else None
        status = np.zeros(n, dtype=np.int32)
        for j in range(n):
            height, width, stored_jpeg = int(located[j, 2]), int(located[j, 3]), located[j, 4] == MODE_JPG
            problem = self._problem(located[j], height, width, stored_jpeg)
            if problem is not None:
                status[j] = SKIP
                self.skip_reasons[int(index[j])] = problem
                if geometry is not None:
                    geometry.append(None)
                continue
            if self.kind == KIND_EVAL:
                self._plan_eval(plan[j], height, width, stored_jpeg)
                continue
            geo = draw_sample_geometry(height, width, r, generator_for(PURPOSE_SAMPLE, self.seed, self.epoch,
                                                                       int(index[j])))
            scale = dct_reduction(height, width, geo.crops(r)) if r.reduced_decoding and stored_jpeg else 1
            plan[j, SCALE] = scale
            plan[j, IMAGE_BOX:IMAGE_BOX + 4] = _scaled_box(geo.image_box, scale, height, width)
            plan[j, IMAGE_FLIP] = geo.image_flipped
            plan[j, JIGSAW_BOX:JIGSAW_BOX + 4] = _scaled_box(geo.jigsaw_box, scale, height, width)
            plan[j, JIGSAW_FLIP] = geo.jigsaw_flipped
            plan[j, ORIGINS:ORIGINS + 2 * len(geo.patch_origins)] = geo.patch_origins.numpy().reshape(-1)
            if geometry is not None:
                geometry.append(geo)
        # Pinned (page-locked) when asked: the host-to-device copy then needs no staging copy.
        out = torch.empty((n, self.sample_bytes), dtype=torch.uint8, pin_memory=self.pin_memory)
        _cut_kernel(located.astype(np.int64), plan, out.numpy(), status, self.kind, r.image_size, r.jigsaw_size,
                    self.tile_size, self.tiles)
        kept = status == OK
        if not kept.all():
            what = {DECODE_FAILED: "its JPEG could not be decoded", RAW_SIZE: "raw image size does not match its field"}
            for j in np.flatnonzero(status != OK):
                self.skip_reasons.setdefault(int(index[j]), what.get(int(status[j]), "corrupt"))
            out = out[torch.from_numpy(kept)]
            out = out.pin_memory() if self.pin_memory else out
            geometry = None if geometry is None else [g for g, k in zip(geometry, kept) if k]
        return _Views(self._batch(out, geometry), index, kept)

    @staticmethod
    def _problem(located_row: np.ndarray, height: int, width: int, stored_jpeg: bool) -> str | None:
        """Why a stored image cannot be cut (the field's size, then the JPEG's structure), or None."""
        try:
            check_pixels(height, width)
        except ValueError as err:
            return str(err)
        if height == 0 or width == 0:
            return f"its field claims {width}x{height} pixels"
        if not stored_jpeg:
            return None
        return jpeg_problem(ctypes.string_at(int(located_row[0]), int(located_row[1])))

    def _plan_eval(self, row: np.ndarray, height: int, width: int, stored_jpeg: bool) -> None:
        """Shorter side to eval_resize_size, centre crop (pipelines/views.py eval_view, torchvision's rounding)."""
        r = self.recipe
        target_h, target_w = eval_size(height, width, r)
        whole = (0, 0, height, width)
        scale = dct_reduction(height, width, [(whole, min(target_h, target_w))]) if r.reduced_decoding and \
            stored_jpeg else 1
        row[SCALE] = scale
        row[IMAGE_BOX:IMAGE_BOX + 4] = (target_h, target_w, int(round((target_h - r.image_size) / 2.0)),
                                        int(round((target_w - r.image_size) / 2.0)))

    def _batch(self, flat: torch.Tensor, geometry) -> dict:
        n, s, k, t = len(flat), self.recipe.image_size, self.tiles, self.tile_size
        # HWC storage, CHW shape: channels-last views as the reference backend yields.
        batch = {B.IMAGE: flat[:, :3 * s * s].view(n, s, s, 3).permute(0, 3, 1, 2)}
        if self.kind != KIND_EVAL:
            batch[B.PATCHES] = flat[:, 3 * s * s:].view(n, k, t, t, 3).permute(0, 1, 4, 2, 3)
        if geometry is not None:
            batch[B.PATCH_ORIGIN] = torch.stack([g.patch_origins for g in geometry])
            batch[B.JIGSAW_BOX] = torch.tensor([g.jigsaw_box for g in geometry], dtype=torch.int64)
            batch[B.IMAGE_BOX] = torch.tensor([g.image_box for g in geometry], dtype=torch.int64)
            batch[B.IMAGE_FLIPPED] = torch.tensor([g.image_flipped for g in geometry], dtype=torch.bool)
            batch[B.JIGSAW_FLIPPED] = torch.tensor([g.jigsaw_flipped for g in geometry], dtype=torch.bool)
        return batch


def _scaled_box(box, scale: int, height: int, width: int) -> tuple[int, int, int, int]:
    """A full-resolution (top, left, h, w) box in the pixels of the image decoded at 1/scale, rounded to whole
    pixels (OpenCV's resize takes whole-pixel boxes; the reference cuts the fractional box with Pillow)."""
    if scale == 1:
        return box
    top, left, h, w = box
    rows, cols = -(-height // scale), -(-width // scale)
    y0, x0 = min(round(top / scale), rows - 1), min(round(left / scale), cols - 1)
    y1, x1 = min(max(round((top + h) / scale), y0 + 1), rows), min(max(round((left + w) / scale), x0 + 1), cols)
    return y0, x0, y1 - y0, x1 - x0


_BYTES = types.CPointer(types.uint8)
# int imdecode(input, input_size, height, width, output, crop_h, crop_w, offset_x, offset_y, scale_num,
#              scale_denom, enable_crop, hflip): libjpeg-turbo's tjDecompress2 (TJFLAG_FASTDCT), scaled num/denom.
_imdecode = types.ExternalFunction("pirl_ffcv_imdecode", types.int32(
    _BYTES, types.uint64, types.uint32, types.uint32, _BYTES, *[types.uint32] * 6, types.boolean, types.boolean))
# void resize(unused, source, rows, cols, start_row, end_row, start_col, end_col, dest, dest_rows, dest_cols):
# cv::resize of the source's window to the destination, INTER_AREA; (H, W, 3) uint8 C-order buffers.
_resize_area = types.ExternalFunction("pirl_ffcv_resize", types.void(*[types.int64] * 11))


@numba.njit(inline="always")
def _resize(src, top, left, h, w, dst):
    """FFCV's libffcv resize (OpenCV INTER_AREA) of src[top:top+h, left:left+w] into dst."""
    _resize_area(0, src.ctypes.data, src.shape[0], src.shape[1], top, top + h, left, left + w,
                 dst.ctypes.data, dst.shape[0], dst.shape[1])


@numba.njit(inline="always")
def _flip_columns(view):
    width = view.shape[1]
    for y in range(view.shape[0]):
        for x in range(width // 2):
            for c in range(3):
                view[y, x, c], view[y, width - 1 - x, c] = view[y, width - 1 - x, c], view[y, x, c]


@numba.njit(parallel=True, nogil=True, cache=True)
def _cut_kernel(located, plan, out, status, kind, image_size, jigsaw_size, tile_size, tiles):
    """Per sample (threads over the batch): decode once, write the image view then It's tiles into out[s]."""
    s_bytes = 3 * image_size * image_size
    t_bytes = 3 * tile_size * tile_size
    for s in numba.prange(located.shape[0]):
        if status[s] != OK:
            continue
        address, size = located[s, 0], located[s, 1]
        height, width, mode = located[s, 2], located[s, 3], located[s, 4]
        stored = numba.carray(cast_int_to_byte_ptr(address), size)
        scale = plan[s, SCALE]
        if mode == MODE_JPG:
            rows, cols = (height + scale - 1) // scale, (width + scale - 1) // scale
            image = np.empty((rows, cols, 3), dtype=np.uint8)
            if _imdecode(cast_int_to_byte_ptr(address), size, height, width, cast_int_to_byte_ptr(image.ctypes.data),
                         height, width, 0, 0, 1, scale, False, False) != 0:
                status[s] = DECODE_FAILED
                continue
        else:
            if size != height * width * 3:
                status[s] = RAW_SIZE
                continue
            image = stored.reshape((height, width, 3))
        view = out[s, :s_bytes].reshape((image_size, image_size, 3))
        if kind == KIND_EVAL:
            resized = np.empty((plan[s, IMAGE_BOX], plan[s, IMAGE_BOX + 1], 3), dtype=np.uint8)
            _resize(image, 0, 0, image.shape[0], image.shape[1], resized)
            top, left = plan[s, IMAGE_BOX + 2], plan[s, IMAGE_BOX + 3]
            view[:] = resized[top:top + image_size, left:left + image_size]
            continue
        _resize(image, plan[s, IMAGE_BOX], plan[s, IMAGE_BOX + 1], plan[s, IMAGE_BOX + 2], plan[s, IMAGE_BOX + 3],
                view)
        if plan[s, IMAGE_FLIP]:
            _flip_columns(view)
        box = plan[s, JIGSAW_BOX:JIGSAW_BOX + 4]
        if kind == KIND_SECOND_IMAGE:
            second = out[s, s_bytes:2 * s_bytes].reshape((image_size, image_size, 3))
            _resize(image, box[0], box[1], box[2], box[3], second)
            if plan[s, JIGSAW_FLIP]:
                _flip_columns(second)
            continue
        crop = np.empty((jigsaw_size, jigsaw_size, 3), dtype=np.uint8)
        _resize(image, box[0], box[1], box[2], box[3], crop)
        for k in range(tiles):
            y, x = plan[s, ORIGINS + 2 * k], plan[s, ORIGINS + 2 * k + 1]
            tile = out[s, s_bytes + k * t_bytes:s_bytes + (k + 1) * t_bytes].reshape((tile_size, tile_size, 3))
            tile[:] = crop[y:y + tile_size, x:x + tile_size]
