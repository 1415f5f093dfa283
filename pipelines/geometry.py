"""Augmentation geometry as pure functions of a torch.Generator: crop boxes, patch origins, patch cutting.

Sampling here instead of inside torchvision.transforms.v2 (which draws from the global torch RNG) makes the
views a function of the per-sample generator alone, and lets the loader report the geometry it used.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch


def sample_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's RandomResizedCrop.get_params algorithm.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); if none fits, the
    centre crop with the aspect ratio clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # All draws at once: one generator call instead of up to 40 (columns: area, ratio, top, left).
    draws = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()
    for u_area, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def cell_origins(grid: int, cell_size: int) -> torch.Tensor:
    """(grid*grid, 2) int64 (y, x) top-left corner of each cell, row-major (cell r*grid + c)."""
    return _cell_origins(grid, cell_size).clone()


@functools.lru_cache(maxsize=16)
def _cell_origins(grid: int, cell_size: int) -> torch.Tensor:
    # Cached: the loader asks for them once per sample (~15 us of tensor ops each time).
    steps = torch.arange(grid, dtype=torch.int64) * cell_size
    return torch.cartesian_prod(steps, steps)


def sample_patch_origins(
    grid: int, cell_size: int, patch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """(grid*grid, 2) int64 (y, x) top-left of each patch in the jigsaw crop: its cell's corner plus an
    offset drawn uniformly from [0, cell_size - patch_size] in y and in x, independently per patch."""
    max_offset = cell_size - patch_size
    if max_offset < 0:
        raise ValueError(f"patch_size={patch_size} does not fit in a cell of {cell_size} px")
    offsets = torch.randint(0, max_offset + 1, (grid * grid, 2), generator=generator)
    return _cell_origins(grid, cell_size) + offsets


def cut_patches(crop: torch.Tensor, origins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, J, J) CPU crop, (K, 2) (y, x) origins -> (K, C, P, P) patches (copies, in origin order), stored
    channels-last (K, P, P, C), as the loaders' views are."""
    hwc = crop.permute(1, 2, 0).numpy()  # numpy slicing: ~1 us a copy where a torch slice costs ~10
    patches = np.empty((len(origins), patch_size, patch_size, hwc.shape[2]), dtype=hwc.dtype)
    for k, (y, x) in enumerate(origins.tolist()):
        patches[k] = hwc[y:y + patch_size, x:x + patch_size]
    return torch.from_numpy(patches).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class SampleGeometry:
    """What a loader cuts for one sample, in the decoded image's pixel coordinates (full resolution).

    The jigsaw views cut nine patches from `jigsaw_box` resized to jigsaw_size; a second image view ("rotation",
    "image") cuts one more image view from it (image scales, resized to image_size, flipped when `jigsaw_flipped`).
    """

    image_box: tuple[int, int, int, int]  # (top, left, h, w) of the image view's crop
    image_flipped: bool
    jigsaw_box: tuple[int, int, int, int]  # (top, left, h, w) of It's crop
    jigsaw_flipped: bool  # second image views only: that view's horizontal flip
    patch_origins: torch.Tensor  # (K, 2) int64 (y, x) of each tile in the resized crop; (1, 2) zeros, second view

    def crops(self, recipe) -> list[tuple[tuple[int, int, int, int], int]]:
        """[(box, output side)] of both resized crops, for choosing a reduced decoding scale."""
        side = recipe.image_size if recipe.second_image_view else recipe.jigsaw_size
        return [(self.image_box, recipe.image_size), (self.jigsaw_box, side)]


def draw_sample_geometry(height: int, width: int, recipe, generator: torch.Generator) -> SampleGeometry:
    """A sample's crop boxes, flips and patch origins for an image of (height, width), in a fixed draw order
    from its generator. Every backend cuts with these, so backends differ only in resampling arithmetic."""
    r = recipe
    image_box = sample_resized_crop_box(height, width, (r.image_scale_min, r.image_scale_max),
                                        (r.ratio_min, r.ratio_max), generator)
    image_flipped = bool(torch.rand((), generator=generator) < r.flip_p)
    if r.second_image_view:
        # It = "the standard data augmentation ... to get a 224x224 image" (paper A.2): its own crop and flip.
        box = sample_resized_crop_box(height, width, (r.image_scale_min, r.image_scale_max),
                                      (r.ratio_min, r.ratio_max), generator)
        flipped = bool(torch.rand((), generator=generator) < r.flip_p)
        origins = torch.zeros(1, 2, dtype=torch.int64)
    else:
        box = sample_resized_crop_box(height, width, (r.jigsaw_scale_min, r.jigsaw_scale_max),
                                      (r.jigsaw_ratio_min, r.jigsaw_ratio_max), generator)
        flipped = False
        origins = sample_patch_origins(r.grid, r.cell_size, r.patch_size, generator)
    return SampleGeometry(image_box, image_flipped, box, flipped, origins)


def dct_reduction(height: int, width: int, crops: list[tuple[tuple[int, int, int, int], int]],
                  max_reduction: int = 8) -> int:
    """The JPEG decoding scale 1/r (r in 1, 2, 4, 8) that still leaves every crop at least its output size.

    libjpeg scales by 1/2, 1/4 or 1/8 inside the inverse DCT, for less decoding work; we use it only where
    every crop of the sample is downscaled by 2x or more anyway, so the antialiased resize that follows still
    downscales (never upsamples).
    """
    factor = min(min(h, w) / side for (_, _, h, w), side in crops)
    r = 1
    while r * 2 <= min(factor, max_reduction) and height >= 2 * r and width >= 2 * r:
        r *= 2
    return r
