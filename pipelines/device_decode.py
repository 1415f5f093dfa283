"""Decoding in the main process (data.decode_device: cpu or cuda): workers read, the main process decodes and cuts.

The DataLoader workers only read each sample's JPEG bytes, check them (pipelines/jpeg_check.py, the
decompression-bomb limit from the header) and draw its geometry, exactly as the reference's workers do
(draw_sample_geometry from the header's full-resolution size, with the generator of (seed, epoch, index)); a
batch crosses to the main process as one byte buffer. There torchvision.io.decode_jpeg decodes the whole batch
on the decode device (libjpeg-turbo on the CPU, nvJPEG's batched decode on a GPU), and
pipelines/batched_resize.py cuts every view of the batch with batched matmuls; the nine patches are then indexed
out of the resized jigsaw crops in one gather. The same code runs on either device: only where the decode runs
and where the tensors live differ.

Pixels: always decoded at full resolution (recipe.reduced_decoding applies to the workers' decode only), resized
with the reference's antialiased bilinear weights in float32; docs/pipelines.md gives the measured differences.
"""

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from pirl_trainer.pipelines import BackendUnavailable
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batched_resize import Crop, resized_crops
from pirl_trainer.pipelines.geometry import draw_sample_geometry
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.common.rng import PURPOSE_SAMPLE, generator_for
from pirl_trainer.pipelines.shard_index import SampleTable, ShardReader
from pirl_trainer.pipelines.views import eval_size, jpeg_header

DECODE_DEVICES = ("workers", "cpu", "cuda")  # data.decode_device
# Keys of the encoded batch the workers hand over (never seen outside this module).
JPEG = "jpeg"  # uint8 (total bytes,): the batch's JPEGs end to end
JPEG_END = "jpeg_end"  # int64 (B,): where each sample's JPEG ends in JPEG
SIZE = "size"  # int64 (B, 2): (height, width) from each JPEG's header
GEOMETRY = "geometry"  # a sample's SampleGeometry, from the worker's dataset to its collate


def decode_device_of(value: str | torch.device) -> torch.device | None:
    """The device the main process decodes on for a decode_device value, or None for "workers" (the workers
    decode). ValueError for a value that is none of DECODE_DEVICES or a cpu / cuda torch.device;
    BackendUnavailable for CUDA where there is none."""
    if isinstance(value, str):
        if value not in DECODE_DEVICES:
            raise ValueError(f"decode_device (data.decode_device) must be one of {DECODE_DEVICES} or a torch.device, "
                             f"got {value!r}")
        if value == "workers":
            return None
        value = torch.device(value)
    if not isinstance(value, torch.device) or value.type not in ("cpu", "cuda"):
        raise ValueError(f"decode_device (data.decode_device) must be one of {DECODE_DEVICES} or a cpu / cuda "
                         f"torch.device, got {value!r}")
    if value.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("decode_device='cuda' (data.decode_device) decodes with nvJPEG on a CUDA device, "
                                 "and none is available here: set data.decode_device=cpu or workers")
    return value


class EncodedDataset(Dataset):
    """Map-style dataset over a SampleTable whose items are a sample's checked JPEG bytes, its header size and
    (pretraining) its drawn geometry; an item key is (epoch, global index)."""

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, mode: str, seed: int):
        self.reader = ShardReader(table)
        self.recipe = recipe
        self.mode = mode
        self.seed = seed

    def __len__(self) -> int:
        return self.reader.table.num_samples

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        """None for a corrupt sample, as the reference's workers give (collate leaves it out, EpochLoader counts
        it)."""
        epoch, i = key
        raw = self.reader.read(i)
        if jpeg_problem(raw.jpg) is not None:
            return None
        try:
            height, width, _ = jpeg_header(raw.jpg)
        except (RuntimeError, ValueError):
            return None
        sample = {JPEG: np.frombuffer(raw.jpg, dtype=np.uint8), SIZE: (height, width), B.INDEX: raw.index}
        if raw.label is not None:
            sample[B.LABEL] = raw.label
        if self.mode == "pretrain":
            sample[GEOMETRY] = draw_sample_geometry(height, width, self.recipe,
                                                    generator_for(PURPOSE_SAMPLE, self.seed, epoch, i))
        return sample


def collate_encoded(samples: list[dict | None]) -> dict:
    """The samples' JPEGs end to end in one uint8 tensor (one shared-memory transfer to the main process, not
    one per sample), their sizes, indexes, labels and geometry; corrupt samples (None) left out."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return {B.INDEX: torch.empty(0, dtype=torch.int64)}
    ends = np.cumsum([len(s[JPEG]) for s in samples])
    out = {
        JPEG: torch.from_numpy(np.concatenate([s[JPEG] for s in samples])),
        JPEG_END: torch.from_numpy(ends.astype(np.int64)),
        SIZE: torch.tensor([s[SIZE] for s in samples], dtype=torch.int64),
        B.INDEX: torch.tensor([s[B.INDEX] for s in samples], dtype=torch.int64),
    }
    if B.LABEL in samples[0]:
        out[B.LABEL] = torch.tensor([s[B.LABEL] for s in samples], dtype=torch.int64)
    if GEOMETRY in samples[0]:
        geos = [s[GEOMETRY] for s in samples]
        out[B.IMAGE_BOX] = torch.tensor([g.image_box for g in geos], dtype=torch.int64)
        out[B.IMAGE_FLIPPED] = torch.tensor([g.image_flipped for g in geos])
        out[B.JIGSAW_BOX] = torch.tensor([g.jigsaw_box for g in geos], dtype=torch.int64)
        out[B.JIGSAW_FLIPPED] = torch.tensor([g.jigsaw_flipped for g in geos])
        out[B.PATCH_ORIGIN] = torch.stack([g.patch_origins for g in geos])
    return out


def _decode_one(jpg: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG (after a batched decode raised), None if it fails. On a GPU a JPEG that nvJPEG refuses is tried once
    more with libjpeg-turbo on the CPU, the decoder of the workers' path, and kept if that decodes it."""
    try:
        return decode_jpeg(jpg, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        if device.type == "cpu":
            return None
    try:
        return decode_jpeg(jpg, mode=ImageReadMode.RGB).to(device)
    except (RuntimeError, ValueError):
        return None


def decode_batch(encoded: dict, device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """(the decoded (3, H, W) uint8 images on `device`, the rows of `encoded` they belong to).

    One batched decode; if it raises (a JPEG that passed the structure check but whose data cannot be decoded),
    the batch is decoded one image at a time and the failures are left out. An image whose decoded size is not
    its header's is left out too: its geometry was drawn for the header's."""
    ends = encoded[JPEG_END].tolist()
    data = [encoded[JPEG][start:end] for start, end in zip([0] + ends[:-1], ends)]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        images = [_decode_one(jpg, device) for jpg in data]
    sizes = encoded[SIZE].tolist()
    rows = [k for k, image in enumerate(images) if image is not None and list(image.shape[1:]) == sizes[k]]
    return [images[k] for k in rows], rows


def cut_patch_batch(crops: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, J, J) crops, (B, K, 2) (y, x) origins on the crops' device -> (B, K, C, size, size) patches, one
    gather for the batch (stored channels-last, as the reference's are)."""
    steps = torch.arange(size, device=crops.device)
    rows = (origins[..., 0, None] + steps)[:, :, :, None]  # (B, K, size, 1)
    cols = (origins[..., 1, None] + steps)[:, :, None, :]  # (B, K, 1, size)
    batch = torch.arange(len(crops), device=crops.device)[:, None, None, None]
    return crops.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 1, 4, 2, 3)


def cut_views(images: list[torch.Tensor], encoded: dict, recipe: PirlRecipe, mode: str,
              with_geometry: bool) -> B.Batch:
    """The loader batch (pipelines/batch.py) of the decoded images: views on the images' device; index, label and
    geometry stay on the host, as the batched stage's draws want them."""
    r, s = recipe, recipe.image_size
    out: B.Batch = {B.INDEX: encoded[B.INDEX]}
    if B.LABEL in encoded:
        out[B.LABEL] = encoded[B.LABEL]
    if mode == "eval":
        crops = []
        for k, (height, width) in enumerate(encoded[SIZE].tolist()):
            rh, rw = eval_size(height, width, r)
            # torchvision's center_crop anchor: round((resized - crop) / 2)
            crops.append(Crop(k, (0, 0, height, width), (rh, rw), (int(round((rh - s) / 2.0)),
                                                                   int(round((rw - s) / 2.0)))))
        out[B.IMAGE] = resized_crops(images, crops, (s, s))
        return out
    image_boxes, jigsaw_boxes = encoded[B.IMAGE_BOX].tolist(), encoded[B.JIGSAW_BOX].tolist()
    image_flips, jigsaw_flips = encoded[B.IMAGE_FLIPPED].tolist(), encoded[B.JIGSAW_FLIPPED].tolist()
    image_crops = [Crop(k, tuple(box), (s, s), flipped=f) for k, (box, f) in enumerate(zip(image_boxes, image_flips))]
    if r.second_image_view:  # the same size as the image view, so one call cuts both
        second = [Crop(k, tuple(box), (s, s), flipped=f) for k, (box, f) in enumerate(zip(jigsaw_boxes, jigsaw_flips))]
        views = resized_crops(images, image_crops + second, (s, s))
        out[B.IMAGE], out[B.PATCHES] = views[:len(images)], views[len(images):, None]
    else:
        j = r.jigsaw_size
        out[B.IMAGE] = resized_crops(images, image_crops, (s, s))
        jigsaw = resized_crops(images, [Crop(k, tuple(box), (j, j)) for k, box in enumerate(jigsaw_boxes)], (j, j))
        out[B.PATCHES] = cut_patch_batch(jigsaw, encoded[B.PATCH_ORIGIN].to(jigsaw.device), r.patch_size)
    if with_geometry:
        out.update({key: encoded[key] for key in B.GEOMETRY_KEYS})
    return out


def decode_and_cut(encoded: dict, recipe: PirlRecipe, *, mode: str, with_geometry: bool,
                   device: torch.device) -> B.Batch:
    """An encoded batch (collate_encoded) -> the loader batch, decoded and cut on `device`; samples that fail to
    decode are left out (EpochLoader names and counts them)."""
    if len(encoded[B.INDEX]) == 0:
        return encoded
    images, rows = decode_batch(encoded, device)
    if len(rows) < len(encoded[B.INDEX]):
        keep = torch.tensor(rows, dtype=torch.int64)
        encoded = {k: v if k in (JPEG, JPEG_END) else v[keep] for k, v in encoded.items()}
        if not rows:
            return {B.INDEX: encoded[B.INDEX]}
    return cut_views(images, encoded, recipe, mode, with_geometry)
