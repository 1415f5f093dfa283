"""SimCLRNet: the trunk and SimCLR's projection head g (Chen et al. 2020), one network for both views."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from pirl_trainer.model.heads import SimCLRHead
from pirl_trainer.model.trunk import build_trunk


class SimCLRNet(nn.Module):
    """forward(view1 (B, 3, S, S), view2 (B, 3, S, S)) -> (z1, z2), both (B, embed_dim) and L2-normalised (the
    NT-Xent loss scores cosine similarities, model/losses.py nt_xent_loss).

    Both views go through the trunk and the head in one call, so every BatchNorm normalises the 2B views
    together, as SimCLR's reference concatenates its views along the batch. The head is 2 layers of width
    feature_dim (2048 -> 2048 -> embed_dim on ResNet-50, the paper's section 2.1); the trunk is `trunk`, which
    the linear probe, the kNN monitor and tools/export.py read.
    """

    def __init__(self, arch: str = "resnet50", embed_dim: int = 128):
        super().__init__()
        self.trunk, self.feature_dim = build_trunk(arch)
        self.head = SimCLRHead(self.feature_dim, self.feature_dim, embed_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if view1.shape != view2.shape:
            raise ValueError(f"the two views must have one shape, got {tuple(view1.shape)} and {tuple(view2.shape)}")
        z = F.normalize(self.head(self.trunk(torch.cat([view1, view2]))), dim=1)  # (2B, embed_dim)
        return z[: view1.shape[0]], z[view1.shape[0]:]
