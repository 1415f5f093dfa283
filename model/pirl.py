"""PIRLNet: one trunk shared by the image view I and the jigsaw view It, plus the heads f and g."""

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from pirl_trainer.model.heads import ImageHead, JigsawHead, RotationHead
from pirl_trainer.model.trunk import build_trunk


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, every BatchNorm of `module` (nn.BatchNorm*, nn.SyncBatchNorm, GlooSyncBatchNorm2d)
    still normalises a train-mode batch by its own statistics but leaves running_mean / running_var /
    num_batches_tracked untouched: track_running_stats is switched off for the block (in eval mode the running
    statistics are still what normalises). Restored on exit, also on an exception."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class PIRLNet(nn.Module):
    """Trunk + heads of PIRL (paper section 2.3, figure 3).

    forward(image (B, 3, S, S), patches (B, num_patches, 3, P, P)) -> (f_img, g_jig), both (B, embed_dim)
    and L2-normalised, since the loss scores pairs by cosine similarity (paper eq. 3).
    The trunk is shared: the patches are scored by the same weights as the image.
    num_patches = 1 is the rotation view (It = one rotated image, paper 4.3): g is then RotationHead.

    patch_bn_stats: whether the patch pass updates the BatchNorm running statistics. False (default): the
    patches are normalised by their own batch statistics, as always in training, but the running statistics are
    those of the image view alone, the input every evaluation (linear probe, kNN monitor, transfer) feeds. True
    was the old behaviour: each step updated them with the image batch, then with the B*9 patches (momentum
    0.1 twice), so they ended up ~90 % patch statistics (24 px tiles of a 96 px crop on the CPU configs) and
    evaluating on whole images with them measured a trunk miscalibrated for its input (docs/evaluation.md,
    "Linear probe").

    head_norm: "none" (the paper's linear heads) or "bn" (centred outputs; model/heads.py output_norm).
    """

    def __init__(self, arch: str = "resnet50", embed_dim: int = 128, num_patches: int = 9,
                 patch_bn_stats: bool = False, head_norm: str = "none"):
        super().__init__()
        self.patch_bn_stats = patch_bn_stats
        self.trunk, self.feature_dim = build_trunk(arch)
        self.num_patches = num_patches
        self.image_head = ImageHead(self.feature_dim, embed_dim, norm=head_norm)
        self.jigsaw_head = (JigsawHead(self.feature_dim, embed_dim, num_patches, norm=head_norm) if num_patches > 1
                            else RotationHead(self.feature_dim, embed_dim, norm=head_norm))

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled res5 features, the input of the linear probe (heads are dropped for transfer)."""
        return self.trunk(image)

    def image_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) L2-normalised f(v_I) alone: all that NPID++ (lambda = 0) and bank refreshes need."""
        return F.normalize(self.image_head(self.trunk(image)), dim=1)

    def forward(
        self, image: torch.Tensor, patches: torch.Tensor | None, generator: torch.Generator | None = None,
        patch_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """patch_order (B, num_patches): the jigsaw head's permutations; None draws them from `generator`.
        patches=None (NPID++) scores the image alone: (f_img, None)."""
        if patches is None:
            return self.image_embedding(image), None
        if patches.dim() != 5 or patches.shape[1] != self.num_patches:
            raise ValueError(
                f"patches must be (B, {self.num_patches}, C, P, P), got {tuple(patches.shape)}"
            )
        batch, num, channels, height, width = patches.shape
        if batch != image.shape[0]:
            raise ValueError(f"image batch {image.shape[0]} != patches batch {batch}")

        with record_function("trunk_image"):
            v_img = self.trunk(image)  # (B, D)

        with record_function("trunk_patches"):
            # All B*9 patches in one trunk call: one large batch keeps the device busy where nine small
            # ones would not. reshape (not view) accepts any input strides.
            flat = patches.reshape(batch * num, channels, height, width)
            if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
                # Follow a channels_last caller, so both trunk passes run in the same memory format.
                flat = flat.contiguous(memory_format=torch.channels_last)
            # Running BN statistics stay the image view's (class docstring, patch_bn_stats).
            with nullcontext() if self.patch_bn_stats else frozen_bn_stats(self.trunk):
                v_patches = self.trunk(flat).reshape(batch, num, self.feature_dim)  # (B, 9, D)

        with record_function("heads"):
            f_img = F.normalize(self.image_head(v_img), dim=1)  # (B, embed_dim)
            g_jig = F.normalize(self.jigsaw_head(v_patches, generator, patch_order), dim=1)  # (B, embed_dim)
        return f_img, g_jig
