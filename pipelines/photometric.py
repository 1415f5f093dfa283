"""Colour jitter + random grayscale with parameters drawn from a torch.Generator (torchvision's semantics).

Per image: with probability jitter_p, brightness/contrast/saturation factors ~ U[max(0, 1-s), 1+s] and a hue
shift ~ U[-h, h], applied in a random order (as torchvision's ColorJitter; an op of strength 0 is skipped);
then grayscale (3 identical channels) with probability grayscale_p. Parameters are drawn for n images at
once so each of the 9 patches gets its own independent draw (paper A.1) from two generator calls.
"""

import torch
from torchvision.transforms.v2 import functional as F

# (name, v2 functional op) in the canonical order; the applied order is a random permutation of it.
_OPS = (
    ("brightness", F.adjust_brightness),
    ("contrast", F.adjust_contrast),
    ("saturation", F.adjust_saturation),
    ("hue", F.adjust_hue),
)
_OP_FUNCS = dict(_OPS)

Op = tuple[str, float]


def sample_photometric(
    n: int,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    jitter_p: float,
    grayscale_p: float,
    generator: torch.Generator,
) -> list[list[Op]]:
    """For each of n images, the list of (op name, factor) to apply in order; ("grayscale", 0.0) last if drawn."""
    strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
    # Columns: jitter coin, brightness, contrast, saturation, hue, grayscale coin.
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64).tolist()
    orders = torch.rand(n, 4, generator=generator).argsort(dim=1).tolist()
    plans = []
    for row, order in zip(u, orders):
        ops: list[Op] = []
        if row[0] < jitter_p:
            for k in order:
                name = _OPS[k][0]
                s = strengths[name]
                if s == 0:
                    continue
                if name == "hue":
                    factor = -s + 2 * s * row[4]
                else:
                    lo = max(0.0, 1.0 - s)
                    factor = lo + (1.0 + s - lo) * row[1 + k]
                ops.append((name, factor))
        if row[5] < grayscale_p:
            ops.append(("grayscale", 0.0))
        plans.append(ops)
    return plans


def apply_photometric(image: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Apply one image's plan to a (3, H, W) float image in [0, 1]."""
    for name, factor in ops:
        if name == "grayscale":
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        else:
            image = _OP_FUNCS[name](image, factor)
    return image
