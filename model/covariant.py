"""The covariant baselines PIRL is compared against (paper section 3): Jigsaw (Noroozi & Favaro 2016) predicts
which of K fixed permutations shuffled the nine patches; Rotation (Gidaris et al. 2018) predicts by which
multiple of 90 degrees the image was turned. Both are K-way classification on pooled trunk features, so the
representation has to change with the transformation: the opposite of PIRL's invariance. The supervised
reference (the paper's "supervised" row, its ceiling) is the same network with the image view's class label as
the target: it needs labelled shards, and it bounds what any pretraining can reach on the same budget.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from pirl_trainer.model.permutations import max_hamming_permutations
from pirl_trainer.common.rng import PURPOSE_JIGSAW_LABEL, counter_words, derive_seed

NUM_ROTATIONS = 4  # 0, 90, 180, 270 degrees (Gidaris et al. 2018, section 2.2)


class JigsawClassifier(nn.Module):
    """(B, num_patches, in_dim) patch features in GRID order + perm_ids (B,) -> (B, num_permutations) logits.

    The trunk scores each patch on its own (PIRLNet runs all B*9 patches as one batch of separate images), so
    shuffling the pooled features is the same as shuffling the patches before the trunk: no patch sees another,
    and BatchNorm's batch statistics do not depend on the order. The shuffle therefore happens here, where it
    is one gather: slot j of sample b holds grid patch permutations[perm_ids[b], j] (JigsawHead's convention).

    Shape (Noroozi & Favaro's context-free network, scaled to pooled ResNet features): a per-patch linear
    in_dim -> patch_dim + ReLU shared by all patches, the patch vectors concatenated in the shuffled order
    (num_patches * patch_dim), then linear -> hidden + ReLU -> linear -> K. Defaults: patch_dim 128 (PIRL's
    per-patch width in g, so the two methods' heads match), hidden 512: 1.37M parameters for in_dim 2048,
    K 1000. hidden=None drops the middle layer, which with patch_dim=1024 is the ResNet-50 Jigsaw of Goyal et
    al. 2019 (the source of the paper's Jigsaw numbers) less its BatchNorm after the per-patch layer.
    """

    def __init__(self, in_dim: int, num_permutations: int = 1000, num_patches: int = 9,
                 hidden: int | None = 512, patch_dim: int = 128, permutation_seed: int = 0):
        super().__init__()
        self.num_patches = num_patches
        self.num_permutations = num_permutations
        # Persistent: the table says what each logit means, so it belongs with the weights. A checkpoint then
        # stays consistent even if a newer numpy or selection code would pick another set, and loading one with
        # another K or patch count fails on the shape instead of silently relabelling the classes. 72 KB.
        self.register_buffer("permutations", max_hamming_permutations(num_permutations, num_patches,
                                                                      permutation_seed), persistent=True)
        self.patch_proj = nn.Linear(in_dim, patch_dim)
        concat = num_patches * patch_dim  # 9 * 128 = 1152 by default
        layers = ([nn.Linear(concat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_permutations)]
                  if hidden else [nn.Linear(concat, num_permutations)])
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, perm_ids: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_patches:
            raise ValueError(f"JigsawClassifier expects (B, {self.num_patches}, D) patch features in grid order, "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if perm_ids.shape != (batch,) or perm_ids.is_floating_point():
            raise ValueError(f"perm_ids must be ({batch},) integer ids, got {tuple(perm_ids.shape)} {perm_ids.dtype}")
        # Ids out of range are not checked here (that would make a GPU wait for the host): indexing raises.
        order = self.permutations[perm_ids]  # (B, 9)
        # The per-patch layer is shared, so projecting before the shuffle equals projecting after; the gather
        # then moves patch_dim-wide rows instead of in_dim-wide ones.
        h = F.relu(self.patch_proj(x))  # (B, 9, patch_dim)
        shuffled = torch.gather(h, 1, order.unsqueeze(-1).expand_as(h))  # (B, 9, patch_dim)
        return self.classifier(shuffled.reshape(batch, -1))  # (B, K)


class PooledClassifier(nn.Module):
    """Pooled res5 feature of one view, (B, 1, in_dim) or (B, in_dim) -> (B, num_classes) logits.

    Gidaris et al. put their classifier on top of the conv trunk; here it sits on the pooled feature that the
    linear probe later reads, like PIRL's RotationHead: one linear layer by default (hidden=None), so the trunk
    has to do the work; hidden=n inserts one ReLU layer of width n.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        self.classifier = (nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, num_classes))
                           if hidden else nn.Linear(in_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] == 1:
            x = x[:, 0]  # the one view's one "patch", as PIRLNet hands the rotation view over
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects (B, 1, D) or (B, D) features, got {tuple(x.shape)}")
        return self.classifier(x)


class RotationClassifier(PooledClassifier):
    """The rotated image's pooled feature -> (B, 4) logits: how many quarter turns."""

    def __init__(self, in_dim: int, hidden: int | None = None):
        super().__init__(in_dim, NUM_ROTATIONS, hidden)


def draw_permutation_ids(seed: int, step: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) int64 in [0, k): the permutation id of each sample, a pure function of (seed, step, global index).

    Counter-based (common/rng.py), like train/pirl.py's patch_orders: a sample gets the same id whichever
    rank or batch holds it. Computed on index's device without a host sync; indexes must be non-negative.
    """
    if not 1 <= k <= 2**31:
        raise ValueError(f"k must be in 1..2**31, got {k}")
    if index.dim() != 1:
        raise ValueError(f"index must be (B,), got {tuple(index.shape)}")
    words = counter_words(derive_seed(PURPOSE_JIGSAW_LABEL, seed, step), index, 1)[:, 0]  # (B,) in [0, 2**32)
    # floor(word * k / 2**32), exact in int64 (k <= 2**31): each id has probability 1/k to within 2**-32,
    # with no division or float rounding (Lemire's multiply-shift).
    return (words * k) >> 32


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"loss": mean cross entropy, "accuracy": detached mean top-1}, both 0-d tensors (no host sync here).

    Logits are upcast to float32: autocast does so for cross_entropy anyway, but a model cast to bf16 would
    otherwise compute the loss with 8 mantissa bits.
    """
    logits = logits.float()
    return {
        "loss": F.cross_entropy(logits, target),
        "accuracy": (logits.detach().argmax(dim=1) == target).float().mean(),
    }


class CovariantNet(nn.Module):
    """The trunk + one classifier: `jigsaw` reads the nine patches of It (B, 9, 3, P, P), `rotation` the one
    rotated view (B, 1, 3, S, S), `supervised` the image view as (B, 1, 3, S, S) with num_classes labels;
    forward(views, target) -> (B, classes) logits. The trunk is named `trunk` as in PIRLNet, so the linear probe
    and tools/export.py read every method's checkpoint alike."""

    def __init__(self, method: str, arch: str = "resnet50", num_permutations: int = 1000, num_patches: int = 9,
                 num_classes: int | None = None):
        super().__init__()
        # the trunk is torchvision's (plus model/small_maps.py, torch only)
        from pirl_trainer.model.trunk import build_trunk

        self.trunk, self.feature_dim = build_trunk(arch)
        if method == "jigsaw":
            self.classifier = JigsawClassifier(self.feature_dim, num_permutations, num_patches)
        elif method == "rotation":
            self.classifier = RotationClassifier(self.feature_dim)
        elif method == "supervised":
            if not num_classes or num_classes < 2:
                raise ValueError(f"CovariantNet: method 'supervised' needs num_classes >= 2, got {num_classes!r}")
            self.classifier = PooledClassifier(self.feature_dim, num_classes)  # torchvision's fc: one linear layer
        else:
            raise ValueError(f"CovariantNet: method must be 'jigsaw', 'rotation' or 'supervised', got {method!r}")
        self.method = method

    def forward(self, patches: torch.Tensor, perm_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch, num = patches.shape[:2]
        flat = patches.reshape(batch * num, *patches.shape[2:])  # every tile as a separate image, one batch
        features = self.trunk(flat).reshape(batch, num, self.feature_dim)
        return self.classifier(features, perm_ids) if self.method == "jigsaw" else self.classifier(features)
