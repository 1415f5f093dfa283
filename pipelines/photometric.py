"""Colour-jitter parameters drawn for many views at once, and the per-image torchvision reference.

torchvision's ColorJitter semantics: with probability jitter_p, brightness / contrast / saturation factors
~ U[max(0, 1 - s), 1 + s] and a hue shift ~ U[-h, h], applied in a random order (an op of strength 0 is
skipped); then grayscale (3 identical channels) with probability grayscale_p.

`draw_jitter` turns uniforms (from common.rng.counter_uniform) into a `Jitter` of tensors; the batched stage
(pipelines/augment.py) applies it to whole batches, `apply_photometric` applies one view's plan with
torchvision.transforms.v2.functional: the reference the batched stage is tested against and benchmarked with.
"""

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

# Op ids: columns of Jitter.factor and values of Jitter.order. NONE pads the order of a view that skips an op.
BRIGHTNESS, CONTRAST, SATURATION, HUE, NONE = 0, 1, 2, 3, 4
OP_NAMES = ("brightness", "contrast", "saturation", "hue")
_OP_FUNCS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), used by every batched kernel.
LUMA = (0.2989, 0.587, 0.114)
# Uniforms one view consumes: jitter coin, 4 factors, 4 order keys, grayscale coin.
JITTER_DRAWS = 10

Op = tuple[str, float]


@dataclass
class Jitter:
    """Photometric parameters of N views (CPU tensors)."""

    order: torch.Tensor  # (N, 4) int64 op ids in the order applied; NONE for skipped ops (always last)
    factor: torch.Tensor  # (N, 4) float64: brightness, contrast, saturation factors and the hue shift
    gray: torch.Tensor  # (N,) bool: grayscale after the jitter

    def __len__(self) -> int:
        return self.order.shape[0]

    def step_factors(self) -> torch.Tensor:
        """(N, 4) float32: the factor each view uses at each step of its order, 1.0 where it has no op (an
        identity for every blend)."""
        factor = self.factor.gather(1, self.order.clamp_max(HUE))
        return torch.where(self.order == NONE, 1.0, factor).to(torch.float32)

    def plans(self) -> list[list[Op]]:
        """Each view's ops as (name, factor) in order, ("grayscale", 0.0) last: apply_photometric's input."""
        out = []
        for order, factor, gray in zip(self.order.tolist(), self.factor.tolist(), self.gray.tolist()):
            ops = [(OP_NAMES[k], factor[k]) for k in order if k != NONE]
            out.append(ops + ([("grayscale", 0.0)] if gray else []))
        return out


def draw_jitter(
    u: torch.Tensor,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grayscale_p: float,
) -> Jitter:
    """(N, JITTER_DRAWS) uniforms in [0, 1) -> the jitter of N views. Pure: same uniforms, same parameters."""
    if u.dim() != 2 or u.shape[1] != JITTER_DRAWS:
        raise ValueError(f"draw_jitter needs (N, {JITTER_DRAWS}) uniforms, got {tuple(u.shape)}")
    u = u.to(torch.float64)
    strengths = torch.tensor([brightness, contrast, saturation, hue], dtype=torch.float64)
    lo = (1.0 - strengths).clamp_min(0.0)
    factor = lo + (1.0 + strengths - lo) * u[:, 1:5]
    factor[:, HUE] = -hue + 2.0 * hue * u[:, 4]
    order = u[:, 5:9].argsort(dim=1)  # a uniform random permutation of the four ops (ties: probability ~2^-32)
    enabled = strengths > 0
    skipped = ~enabled[order] | (u[:, :1] >= jitter_p)  # (N, 4): op absent from this view's plan
    # NONE goes last, keeping the applied ops in their drawn order (a stable sort on the skip flag).
    order = torch.where(skipped, NONE, order)
    order = order.gather(1, skipped.to(torch.int8).argsort(dim=1, stable=True))
    return Jitter(order=order, factor=factor, gray=u[:, 9] < grayscale_p)


def apply_photometric(image: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Apply one view's plan to a (3, H, W) float image in [0, 1] with torchvision's functional ops."""
    for name, factor in ops:
        if name == "grayscale":
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        else:
            image = _OP_FUNCS[OP_NAMES.index(name)](image, factor)
    return image
