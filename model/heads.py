"""Projection heads f (image) and g (jigsaw) of PIRL, section 2.3 and supplement A."""

import torch
import torch.nn as nn

HEAD_NORMS = ("none", "bn")


def output_norm(kind: str, dim: int) -> nn.Module:
    """What follows a head's last linear layer, before the L2 normalisation (model.head_norm).

    "none": nothing, the paper's linear heads. "bn": BatchNorm1d without affine parameters, which centres each
    embedding dimension over the batch. Why: pooled res5 features are ReLU outputs with a large common mean, so a
    linear head starts with every image on nearly one direction (mean pairwise cosine 0.76 for ResNet-18), and
    on a short schedule the memory-bank loss drives that common component up instead of down (docs/training.md,
    "Short schedules on a CPU"). Centring removes it by construction, as SimCLR's and MoCo v3's
    BatchNorm heads do.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm1d(dim, affine=False)
    raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {kind!r}")


class ImageHead(nn.Module):
    """f: one linear projection of the pooled res5 feature, (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 128, norm: str = "none"):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = output_norm(norm, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class JigsawHead(nn.Module):
    """g: a linear projection per patch, the patch vectors concatenated in a random order, a second linear.

    (B, num_patches, in_dim) -> (B, out_dim). The order is drawn afresh for every sample on every call
    (paper section 2.3, step 4): the patches arrive in grid order and this head is where the jigsaw
    shuffle happens, so the representation cannot rely on where a patch came from.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, num_patches: int = 9, norm: str = "none"):
        super().__init__()
        self.num_patches = num_patches
        self.patch_proj = nn.Linear(in_dim, out_dim)  # shared by all patches
        self.mix = nn.Linear(num_patches * out_dim, out_dim)  # 9 * 128 = 1152 -> 128 in the paper
        self.norm = output_norm(norm, out_dim)

    def sample_orders(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(batch, num_patches) int64: row b is a uniformly random permutation of the patch slots.

        argsort of i.i.d. uniforms is a uniform permutation (ties have probability ~0) and needs no loop.
        A given generator must live on `device`.
        """
        noise = torch.rand(batch, self.num_patches, generator=generator, device=device)
        return torch.argsort(noise, dim=1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                order: torch.Tensor | None = None) -> torch.Tensor:
        """order: (B, num_patches) permutations to use (the training loop draws them from (seed, step, global
        index), so that they do not depend on the rank); None draws them here from `generator`."""
        if x.dim() != 3 or x.shape[1] != self.num_patches:
            raise ValueError(
                f"JigsawHead expects (B, {self.num_patches}, D) patch features, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        h = self.patch_proj(x)  # (B, 9, out)
        if order is None:
            order = self.sample_orders(batch, x.device, generator)  # (B, 9)
        elif order.shape != (batch, self.num_patches):
            raise ValueError(f"order must be ({batch}, {self.num_patches}), got {tuple(order.shape)}")
        # (B, 9, out): slot j of sample b holds patch order[b, j]
        shuffled = torch.gather(h, 1, order.unsqueeze(-1).expand_as(h))
        return self.norm(self.mix(shuffled.reshape(batch, -1)))  # (B, 9*out) -> (B, out)


class RotationHead(nn.Module):
    """g for the rotation view (paper supplement A.2): It is one rotated image, so there are no patches to
    shuffle and mix; "a single linear layer" on its pooled res5 feature stands in for the jigsaw head.
    It has its own weights (not f's): PIRL scores f(v_I) against g(v_It), two different projections.

    (B, 1, in_dim) -> (B, out_dim), the same call signature as JigsawHead (generator and order unused).
    """

    def __init__(self, in_dim: int, out_dim: int = 128, norm: str = "none"):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = output_norm(norm, out_dim)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                order: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"RotationHead expects (B, 1, D) features of the one rotated view, got {tuple(x.shape)}")
        return self.norm(self.proj(x[:, 0]))


class SimCLRHead(nn.Module):
    """SimCLR's projection g (Chen et al. 2020, section 2.1; google-research/simclr's projection_head):
    linear (no bias) -> BatchNorm -> ReLU -> linear (no bias) -> BatchNorm, (B, in_dim) -> (B, out_dim).

    hidden_dim = in_dim in the paper (2048 -> 2048 -> 128 on ResNet-50). The last BatchNorm is output_norm("bn"):
    centred and scaled, without SimCLR's per-dimension scale (its center=False, scale=True layer), which the L2
    normalisation that follows makes a reweighting of the dimensions only.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim, bias=False)  # the BatchNorm's shift is the bias
        self.hidden_norm = nn.BatchNorm1d(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim, bias=False)
        self.norm = output_norm("bn", out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(torch.relu(self.hidden_norm(self.hidden(x)))))


class MoCoV2Head(nn.Module):
    """MoCo v2's projection (Chen et al. 2020, "Improved baselines", section 2; the public builder.py's `mlp`
    option): linear -> ReLU -> linear, no BatchNorm, (B, in_dim) -> (B, out_dim); hidden_dim = in_dim there."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.hidden(x)))
