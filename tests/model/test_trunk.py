import pytest
import torch
import torch.nn as nn

from pirl_trainer.model.trunk import build_trunk


@pytest.mark.parametrize(
    ("arch", "dim", "size"),
    [("resnet18", 512, 32), ("resnet34", 512, 32), ("resnet50", 2048, 64)],
)
def test_feature_dim_and_shape(arch, dim, size):
    trunk, feature_dim = build_trunk(arch)
    assert feature_dim == dim
    assert isinstance(trunk.fc, nn.Identity)
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18.*resnet34.*resnet50"):
        build_trunk("resnet51")


def test_random_init_differs_between_builds():
    a, _ = build_trunk("resnet18")
    b, _ = build_trunk("resnet18")
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
