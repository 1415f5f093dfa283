"""Augmentation geometry as pure functions of a torch.Generator: crop boxes, patch origins, patch cutting.

Sampling here instead of inside torchvision.transforms.v2 (which draws from the global torch RNG) makes the
views a function of the per-sample generator alone, and lets the loader report the geometry it used.
"""

import math

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
    return cell_origins(grid, cell_size) + offsets


def cut_patches(crop: torch.Tensor, origins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, J, J) crop, (K, 2) (y, x) origins -> (K, C, P, P) patches (copies, in origin order)."""
    return torch.stack([crop[:, y:y + patch_size, x:x + patch_size] for y, x in origins.tolist()])
