import pytest
import torch
import torch.nn as nn
import torchvision

from pirl_trainer.model.small_maps import SMALL_MAP_PIXELS, SmallMapConv2d, use_small_map_convs
from pirl_trainer.model.trunk import build_trunk


def conv_pair(cin, cout, kernel, stride, padding, bias, dilation=1):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, bias=bias)
    small = use_small_map_convs(nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation,
                                                        bias=bias)))[0]
    small.load_state_dict(plain.state_dict())
    return plain, small


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "bias", "dilation"),
    [
        (1, 3, 1, 1, False, 1),  # res5's 3x3 on a 1x1 map: the centre tap alone
        (1, 3, 2, 1, True, 1),
        (1, 1, 1, 0, False, 1),
        (1, 3, 1, 2, False, 2),  # dilated: the centre tap is still the one over the pixel
        (2, 3, 1, 1, True, 1),  # 2x2 maps: im2col + matmul
        (2, 3, 2, 1, False, 1),
        (2, 1, 2, 0, False, 1),  # the downsample shortcut
        (4, 3, 1, 1, False, 1),  # above SMALL_MAP_PIXELS: oneDNN as before
    ],
)
def test_equals_conv2d_forward_and_gradients(size, kernel, stride, padding, bias, dilation):
    plain, small = conv_pair(6, 5, kernel, stride, padding, bias, dilation)
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    plain, small = plain.double(), small.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), small(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(small.weight.grad, plain.weight.grad)
    if bias:
        torch.testing.assert_close(small.bias.grad, plain.bias.grad)


def test_large_maps_take_the_conv2d_path_bit_for_bit():
    plain, small = conv_pair(4, 4, 3, 1, 1, True)
    x = torch.randn(2, 4, 3, 3)  # 9 pixels > SMALL_MAP_PIXELS
    assert 9 > SMALL_MAP_PIXELS
    assert torch.equal(small(x), plain(x))


def test_trunk_keeps_torchvision_keys_and_outputs():
    trunk, _ = build_trunk("resnet18")
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is SmallMapConv2d for m in convs)
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    assert list(trunk.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(trunk.state_dict())
    trunk.eval()
    reference.eval()
    with torch.no_grad():
        for size in (24, 64):  # res5 at 1x1 and 2x2: both matmul paths run
            x = torch.randn(4, 3, size, size)
            torch.testing.assert_close(trunk(x), reference(x), rtol=1e-4, atol=1e-4)


def test_conversion_is_in_place_and_keeps_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1)))
    params = [p for p in net.parameters()]
    assert use_small_map_convs(net) is net
    assert [p for p in net.parameters()] == params
    assert all(type(m) is SmallMapConv2d for m in net.modules() if isinstance(m, nn.Conv2d))
