"""Gaussian blur of whole batches of views (SimCLR's and MoCo v2's augmentation), on the batch's device.

What is blurred: the image view and, where It is a second image view (jigsaw_view "rotation" or "image"), its one
tile, each with its own coin (recipe.blur_p) and sigma ~ U[blur_sigma_min, blur_sigma_max]; never jigsaw patches.
The draws are counter-based hashes of (seed, epoch, index, slot) on their own stream (rng.PURPOSE_BLUR), so the
stage's other draws are the same with or without the blur.

Where: the batched stage (pipelines/augment.py) blurs its painted, normalised output, one pass shared by every
kernel choice (numba, tensor, compiled). SimCLR and MoCo v2 blur after the colour jitter and grayscale and before
normalising; normalising is a per-channel affine map, which commutes with a kernel that sums to 1 under reflect
padding, so blurring after it gives the same views (up to float rounding).

Arithmetic: torchvision's gaussian_blur (weights softmax(-(x / sigma)^2) at x = (i - (k - 1) / 2) / sqrt(2), i.e.
exp(-d^2 / (2 sigma^2)) normalised; reflect padding of k // 2), as two 1-D passes of per-view kernels, each pass
one grouped (depthwise) conv2d over the whole set of views: equal to torchvision's 2-D kernel up to rounding.
Kernel size: SimCLR's, 10 % of the side (blur_kernel_fraction) made odd, 23 px at 224.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as NF

from pirl_trainer.common.rng import PURPOSE_BLUR, counter_uniform, derive_seed

# Uniforms per sample: the image view's coin and sigma, then the second image view's.
BLUR_DRAWS = 4


@dataclass
class Blur:
    """Blur parameters of N views (CPU tensors)."""

    apply: torch.Tensor  # (N,) bool: whether the view is blurred
    sigma: torch.Tensor  # (N,) float64: the kernel's standard deviation in pixels (meaningful where apply)

    def __len__(self) -> int:
        return self.apply.shape[0]

    @staticmethod
    def none(n: int) -> "Blur":
        """N views left sharp."""
        return Blur(apply=torch.zeros(n, dtype=torch.bool), sigma=torch.zeros(n, dtype=torch.float64))


def draw_blur(recipe, seed: int, epoch: int, index: torch.Tensor) -> tuple[Blur, Blur]:
    """(the image view's, the second image view's) blur of the samples `index` (B,): a pure function of
    (recipe, seed, epoch, index). Both are drawn whatever jigsaw_view is (the image view's blur does not depend on
    it); nothing is drawn where recipe.blur_p is 0."""
    index = index.detach().to("cpu", torch.int64)
    b = index.shape[0]
    if recipe.blur_p == 0:
        return Blur.none(b), Blur.none(b)
    u = counter_uniform(derive_seed(PURPOSE_BLUR, seed, epoch), index, BLUR_DRAWS).view(b, 2, 2)
    apply = u[..., 0] < recipe.blur_p
    sigma = recipe.blur_sigma_min + (recipe.blur_sigma_max - recipe.blur_sigma_min) * u[..., 1]
    return Blur(apply[:, 0].clone(), sigma[:, 0].clone()), Blur(apply[:, 1].clone(), sigma[:, 1].clone())


def kernel_size(side: int, fraction: float) -> int:
    """SimCLR's kernel size for a view of `side` px: int(fraction * side), made odd as SimCLR does (radius
    size // 2, size 2 * radius + 1): 23 at 224 px and 10 %. 1 (no blur) below 2 px."""
    radius = int(round(side * fraction, 9)) // 2  # round(, 9): 0.29 * 100 is 28.999999999999996
    return 2 * radius + 1


def gaussian_kernels(sigma: torch.Tensor, size: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(N,) sigmas -> (N, size) normalised 1-D Gaussian weights, torchvision's _get_gaussian_kernel1d per row."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, dtype=dtype, device=device)
    sigma = sigma.to(device=x.device, dtype=dtype).unsqueeze(1)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=1)


def blur_views(views: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float views, (N,) sigmas -> the views blurred with an odd size x size Gaussian of their own
    sigma, reflect padding (torchvision's gaussian_blur of each view). Runs on the views' device."""
    if size % 2 == 0 or size < 1:
        raise ValueError(f"blur kernel size must be odd and positive, got {size}")
    n, c, h, w = views.shape
    pad = size // 2
    if pad >= min(h, w):
        raise ValueError(f"blur kernel of {size} px needs views larger than {pad} px, got {h}x{w}")
    weights = gaussian_kernels(sigma, size, views.dtype, views.device).repeat_interleave(c, dim=0)  # (N*C, size)
    x = NF.pad(views, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    # A symmetric kernel: conv2d's cross-correlation is the convolution. Rows, then columns, of every view at once.
    x = NF.conv2d(x, weights.view(n * c, 1, 1, size), groups=n * c)
    x = NF.conv2d(x, weights.view(n * c, 1, size, 1), groups=n * c)
    return x.view(n, c, h, w)


def blur_in_place(views: torch.Tensor, blur: Blur, size: int) -> torch.Tensor:
    """Blur the views (N, C, H, W) float whose blur.apply is set, in place; returns `views`. The selection is read
    on the host (blur's tensors live there), so a CUDA batch is never waited for; nothing runs where no view is
    blurred or the kernel is 1 px."""
    if len(blur) != views.shape[0]:
        raise ValueError(f"{len(blur)} blur draws for {views.shape[0]} views")
    rows = blur.apply.nonzero().squeeze(1)
    if size < 2 or len(rows) == 0:
        return views
    if len(rows) == len(blur):
        views.copy_(blur_views(views, blur.sigma, size))
        return views
    rows_dev = rows.to(views.device, non_blocking=True)
    views.index_copy_(0, rows_dev, blur_views(views.index_select(0, rows_dev), blur.sigma[rows], size))
    return views
