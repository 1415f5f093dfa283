"""Convolutions on tiny feature maps as plain matrix products, on CPU.

At CPU resolutions (64 px views, 24 px patches) ResNet's res5 runs on 1x1 and 2x2 maps, and oneDNN's backward of a
3x3 convolution there is pathologically slow: measured on 2 cores (torch 2.14), 254 ms for 288 patches of 512
channels at 1x1 against 58 ms for the same convolution as im2col + matmul, and 4x less again as the centre tap's
matmul; res5's convolutions on such maps took a third of the whole step. Inputs of at most SMALL_MAP_PIXELS pixels
go through the matrix product (from 3x3 maps up oneDNN is faster again: 31 vs 51 ms at 3x3). On CUDA and for larger
maps nothing changes.

The module stays an nn.Conv2d with the same parameters and state_dict keys, so checkpoints, the torchvision export
and random initialisation are untouched; the result equals F.conv2d to float rounding (tests/model/test_small_maps.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_MAP_PIXELS = 4  # 2x2 and 1x1 inputs; measured crossover in the module docstring


class SmallMapConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if (x.device.type != "cpu" or h * w > SMALL_MAP_PIXELS or self.groups != 1
                or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            return super().forward(x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if h == w == oh == ow == 1 and ph % dh == 0 and pw % dw == 0 and ph // dh < kh and pw // dw < kw:
            # one input pixel, one output pixel: every tap but the one over the pixel multiplies zero padding
            out = F.linear(x.flatten(1), self.weight[:, :, ph // dh, pw // dw], self.bias)
            return out.view(n, -1, 1, 1)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, oh*ow)
        out = torch.matmul(self.weight.flatten(1), cols)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(n, -1, oh, ow)


def use_small_map_convs(module: nn.Module) -> nn.Module:
    """Turns every plain nn.Conv2d inside module into a SmallMapConv2d in place (same parameters); returns module."""
    for sub in module.modules():
        if type(sub) is nn.Conv2d:
            sub.__class__ = SmallMapConv2d  # a subclass adding no state: parameters, hooks and keys stay as they are
    return module
