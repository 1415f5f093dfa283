"""The convolutional trunk: a torchvision ResNet whose output is the pooled res5 feature v."""

from collections.abc import Callable

import torch.nn as nn
from torchvision import models

from pirl_trainer.model.small_maps import use_small_map_convs

# Explicit table (DESIGN.md: no registries). ResNet-50 is the paper's trunk (section 2.3);
# the smaller ones keep tests and CPU runs cheap.
_ARCHS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}


def build_trunk(arch: str) -> tuple[nn.Module, int]:
    """Randomly initialised ResNet mapping (B, 3, H, W) to (B, D) pooled res5 features.

    The classifier `fc` is replaced by Identity, so the module's output is the global-average-pooled
    res5 activation the paper calls v (section 2.3); D is read from the removed classifier
    (512 for resnet18/34, 2048 for resnet50). The module keeps torchvision's attribute names, so its
    state_dict loads into a torchvision resnet of the same arch (with strict=False for the missing fc). Its
    convolutions on tiny maps run as matrix products on CPU (model/small_maps.py: ~1.8x the step at 64 px).
    """
    try:
        factory = _ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown trunk arch {arch!r}; valid: {', '.join(sorted(_ARCHS))}") from None
    net = factory(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return use_small_map_convs(net), feature_dim
