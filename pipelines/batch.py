"""The two Batch contracts (DESIGN.md, "Two contracts, one split") and checkers reused by every backend's tests.

Loaders cut, the batched stage (pipelines/augment.py) paints. Side by side, for a recipe with image_size S and
It made of K tiles of T px (jigsaw views: K = 9 patches of T = patch_size in grid order, cell r*grid + c;
second image views, "rotation" and "image": K = 1 tile of T = S):

| key       | loader batch (every backend yields)              | model batch (the stage returns, training reads) |
|-----------|--------------------------------------------------|-------------------------------------------------|
| image     | uint8 (B, 3, S, S): crop + flip                  | float32 (B, 3, S, S): jittered, normalised      |
| patches   | uint8 (B, K, 3, T, T): crop, tiles at offsets    | float32 (B, K, 3, T, T): rotated, jittered per  |
|           | (unrotated, unjittered)                          | tile, normalised                                |
| index     | int64 (B,): global sample index = bank row       | the same                                        |
| label     | int64 (B,), when the shards are labelled         | the same                                        |
Eval mode (mode="eval"): image only (shorter side to eval size, centre crop), plus index and label; the
stage's eval form converts and normalises it. uint8 views may have any strides (the reference backend yields
channels-last ones); DALI's live on the GPU.
"""

from typing import TypedDict

import torch

from pirl_trainer.pipelines.geometry import cell_origins
from pirl_trainer.pipelines.recipe import PirlRecipe

IMAGE = "image"  # the view I (eval mode: resize + centre crop)
PATCHES = "patches"  # the view It: its K tiles
INDEX = "index"  # int64 (B,): global sample index = memory-bank row
LABEL = "label"  # int64 (B,): only when the shards are labelled
# Geometry, only when asked for (with_geometry=True): what the loader drew, for tests and debugging.
PATCH_ORIGIN = "patch_origin"  # int64 (B, K, 2): (y, x) top-left of each tile inside It's resized crop
JIGSAW_BOX = "jigsaw_box"  # int64 (B, 4): (top, left, h, w) of It's crop in the decoded image
IMAGE_BOX = "image_box"  # int64 (B, 4): (top, left, h, w) of the image-view crop in the decoded image
IMAGE_FLIPPED = "image_flipped"  # bool (B,): whether the image view was flipped
JIGSAW_FLIPPED = "jigsaw_flipped"  # bool (B,): whether It's crop was flipped (second image views; else False)
GEOMETRY_KEYS = (PATCH_ORIGIN, JIGSAW_BOX, IMAGE_BOX, IMAGE_FLIPPED, JIGSAW_FLIPPED)

MODES = ("pretrain", "eval")


class Batch(TypedDict, total=False):
    image: torch.Tensor
    patches: torch.Tensor
    index: torch.Tensor
    label: torch.Tensor
    patch_origin: torch.Tensor
    jigsaw_box: torch.Tensor
    image_box: torch.Tensor
    image_flipped: torch.Tensor
    jigsaw_flipped: torch.Tensor


def _fail(msg: str) -> None:
    raise ValueError(f"Batch contract: {msg}")


def _check_tensor(batch: dict, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = batch[key]
    if not isinstance(t, torch.Tensor):
        _fail(f"{key!r} is a {type(t).__name__}, expected a torch.Tensor")
    if tuple(t.shape) != shape:
        _fail(f"{key!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        _fail(f"{key!r} has dtype {t.dtype}, expected {dtype}")
    return t


def _check_normalised(t: torch.Tensor, key: str, recipe: PirlRecipe, channel_dim: int) -> None:
    if not torch.isfinite(t).all():
        _fail(f"{key!r} has non-finite values")
    # A [0, 1] image normalised per channel lies in [-mean/std, (1-mean)/std]; 1e-3 allows resampling slack.
    shape = [1] * t.dim()
    shape[channel_dim] = 3
    mean = torch.tensor(recipe.mean, device=t.device).view(shape)
    std = torch.tensor(recipe.std, device=t.device).view(shape)
    lo, hi = -mean / std - 1e-3, (1 - mean) / std + 1e-3
    if (t < lo).any() or (t > hi).any():
        _fail(f"{key!r} values in [{t.min().item():.3f}, {t.max().item():.3f}] fall outside the normalised "
              f"range of a [0, 1] image: not normalised with recipe.mean/std?")


def check_loader_batch(batch: dict, recipe: PirlRecipe, labelled: bool, mode: str = "pretrain") -> None:
    """Raise ValueError describing the first way `batch` breaks the uint8 loader contract; device-agnostic."""
    _check(batch, recipe, labelled, mode, torch.uint8)


def check_batch(batch: dict, recipe: PirlRecipe, labelled: bool, mode: str = "pretrain") -> None:
    """Raise ValueError describing the first way `batch` breaks the float model contract; device-agnostic."""
    _check(batch, recipe, labelled, mode, torch.float32)


def _check(batch: dict, recipe: PirlRecipe, labelled: bool, mode: str, dtype: torch.dtype) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    required = [IMAGE, INDEX] + ([PATCHES] if mode == "pretrain" else []) + ([LABEL] if labelled else [])
    allowed = set(required) | (set(GEOMETRY_KEYS) if mode == "pretrain" else set())
    missing = [k for k in required if k not in batch]
    if missing:
        _fail(f"missing keys {missing} (has {sorted(batch)})")
    extra = sorted(set(batch) - allowed)
    if extra:
        _fail(f"unexpected keys {extra} for mode={mode!r}, labelled={labelled}")
    b = batch[INDEX].shape[0] if isinstance(batch[INDEX], torch.Tensor) else -1
    if b < 1:
        _fail(f"{INDEX!r} must be a non-empty 1-d tensor")
    s, t, k = recipe.image_size, recipe.view_tile_size, recipe.view_tiles
    index = _check_tensor(batch, INDEX, (b,), torch.int64)
    if index.unique().numel() != b:
        _fail(f"{INDEX!r} has duplicate entries within the batch")
    if (index < 0).any():
        _fail(f"{INDEX!r} has negative entries")
    image = _check_tensor(batch, IMAGE, (b, 3, s, s), dtype)
    patches = _check_tensor(batch, PATCHES, (b, k, 3, t, t), dtype) if mode == "pretrain" else None
    if dtype == torch.float32:
        _check_normalised(image, IMAGE, recipe, 1)
        if patches is not None:
            _check_normalised(patches, PATCHES, recipe, 2)
    if labelled and (_check_tensor(batch, LABEL, (b,), torch.int64) < 0).any():
        _fail(f"{LABEL!r} has negative entries")
    if PATCH_ORIGIN in batch:
        origin = _check_tensor(batch, PATCH_ORIGIN, (b, k, 2), torch.int64)
        if recipe.second_image_view:
            if origin.any():
                _fail(f"{PATCH_ORIGIN!r} of the {recipe.jigsaw_view!r} view must be zeros (its one tile is the whole "
                      "crop)")
        else:
            offset = origin - cell_origins(recipe.grid, recipe.cell_size).to(origin.device)
            if (offset < 0).any() or (offset > recipe.max_patch_offset).any():
                _fail(f"{PATCH_ORIGIN!r} puts a patch outside its grid cell "
                      f"(offsets must be in [0, {recipe.max_patch_offset}])")
    for key in (JIGSAW_BOX, IMAGE_BOX):
        if key in batch:
            _check_tensor(batch, key, (b, 4), torch.int64)
    for key in (IMAGE_FLIPPED, JIGSAW_FLIPPED):
        if key in batch:
            _check_tensor(batch, key, (b,), torch.bool)
