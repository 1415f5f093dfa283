"""JPEG bytes -> the PIRL views of one sample (reference backend), a pure function of (bytes, recipe, generator).

Pretraining (paper supplement A.1), from one decoded image:
- image view I: random resized crop -> image_size, horizontal flip, colour jitter, random grayscale, normalise;
- jigsaw view It: its own random resized crop (scale >= jigsaw_scale_min) -> jigsaw_size, a grid x grid of
  cells, one patch_size patch per cell at a random offset, colour jitter + grayscale drawn for each patch
  independently, normalise.
Geometry runs on uint8 (torchvision's fast antialiased uint8 resize); photometric ops run on float in [0, 1].
"""

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipelines import batch as B
from pipelines.geometry import cut_patches, sample_patch_origins, sample_resized_crop_box
from pipelines.photometric import apply_photometric, sample_photometric
from pipelines.recipe import PirlRecipe


def decode(jpg: memoryview | bytes | bytearray) -> torch.Tensor:
    """JPEG bytes -> (3, H, W) uint8 RGB (greyscale and CMYK JPEGs come out as 3 channels)."""
    data = torch.frombuffer(jpg, dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB)


def _normalise(x: torch.Tensor, recipe: PirlRecipe) -> torch.Tensor:
    return F.normalize(x, mean=recipe.mean, std=recipe.std)


def pretrain_views(image: torch.Tensor, recipe: PirlRecipe, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """(3, H, W) uint8 -> image (3, S, S), patches (K, 3, P, P) float32 normalised, plus the drawn geometry.

    The draws from `generator` happen in a fixed order, so a sample's views depend on its generator only.
    """
    r = recipe
    _, height, width = image.shape

    # Image view I.
    top, left, h, w = sample_resized_crop_box(height, width, (r.image_scale_min, r.image_scale_max),
                                              (r.ratio_min, r.ratio_max), generator)
    view = F.resized_crop(image, top, left, h, w, [r.image_size, r.image_size], antialias=True)
    flipped = torch.rand((), generator=generator).item() < r.flip_p
    if flipped:
        view = F.horizontal_flip(view)
    (plan,) = sample_photometric(1, brightness=r.brightness, contrast=r.contrast, saturation=r.saturation,
                                 hue=r.hue, jitter_p=r.jitter_p, grayscale_p=r.grayscale_p, generator=generator)
    view = apply_photometric(F.to_dtype(view, torch.float32, scale=True), plan)

    # Jigsaw view It.
    jtop, jleft, jh, jw = sample_resized_crop_box(height, width, (r.jigsaw_scale_min, r.jigsaw_scale_max),
                                                  (r.jigsaw_ratio_min, r.jigsaw_ratio_max), generator)
    crop = F.resized_crop(image, jtop, jleft, jh, jw, [r.jigsaw_size, r.jigsaw_size], antialias=True)
    origins = sample_patch_origins(r.grid, r.cell_size, r.patch_size, generator)  # (K, 2)
    patches = F.to_dtype(cut_patches(crop, origins, r.patch_size), torch.float32, scale=True)  # (K, 3, P, P)
    plans = sample_photometric(r.num_patches, brightness=r.patch_brightness, contrast=r.patch_contrast,
                               saturation=r.patch_saturation, hue=r.patch_hue, jitter_p=r.patch_jitter_p,
                               grayscale_p=r.patch_grayscale_p, generator=generator)
    patch_flips = (torch.rand(r.num_patches, generator=generator) < r.patch_flip_p).tolist()
    for k, (patch_plan, flip) in enumerate(zip(plans, patch_flips)):
        patch = apply_photometric(patches[k], patch_plan)
        patches[k] = F.horizontal_flip(patch) if flip else patch

    return {
        B.IMAGE: _normalise(view, r),
        B.PATCHES: _normalise(patches, r),
        B.PATCH_ORIGIN: origins,
        B.JIGSAW_BOX: torch.tensor([jtop, jleft, jh, jw], dtype=torch.int64),
        B.IMAGE_BOX: torch.tensor([top, left, h, w], dtype=torch.int64),
        B.IMAGE_FLIPPED: torch.tensor(flipped),
    }


def eval_view(image: torch.Tensor, recipe: PirlRecipe) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S) float32: shorter side to eval_resize_size, centre crop, normalise."""
    view = F.resize(image, [recipe.eval_resize_size], antialias=True)
    view = F.center_crop(view, [recipe.image_size, recipe.image_size])
    return _normalise(F.to_dtype(view, torch.float32, scale=True), recipe)
