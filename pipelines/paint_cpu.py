"""The batched stage's photometric work as one compiled CPU kernel (numba), view by view in the cache.

Why a second implementation beside the tensor kernels of pipelines/augment.py: on a CPU each tensor op streams
its whole input through memory and allocates its output, and a view's plan is ~40 such ops. Here each view is
converted, jittered op by op, grayed and normalised in its own output rows while they sit in the cache, in
loops the compiler vectorises: 11x the per-view torchvision loop where the tensor kernels reach 3.3x
(docs/results.md). It follows torchvision's formulas op for op in float32 (hue: the equivalent formula of
pipelines.augment.hue) and is tested against torchvision like the tensor kernels. The GPU path stays on the
tensor kernels, which are tested on the CPU too.
"""

import numpy as np
import torch

try:
    import numba
except ImportError:  # an optional speed-up: pipelines/augment.py falls back to its tensor kernels
    numba = None

from pirl_trainer.pipelines.photometric import BRIGHTNESS, CONTRAST, HUE, LUMA, SATURATION, Jitter

_F = np.float32
LUMA_R, LUMA_G, LUMA_B = (_F(w) for w in LUMA)  # float32 constants: numba keeps the arithmetic in float32


def available() -> bool:
    return numba is not None


def _hue_pixel(r, g, b, shift):
    """torchvision's adjust_hue on one pixel (the formula of pipelines.augment.hue)."""
    one, zero = _F(1.0), _F(0.0)
    hi = max(max(r, g), b)
    lo = min(min(r, g), b)
    span = hi - lo
    if r == hi:
        h6 = (g - b) / max(span, _F(1e-30))
    elif g == hi:
        h6 = (b - r) / max(span, _F(1e-30)) + _F(2.0)
    else:
        h6 = (r - g) / max(span, _F(1e-30)) + _F(4.0)
    h6 = h6 + shift * _F(6.0)  # in [-4, 8]: wrap into [0, 6)
    if h6 < zero:
        h6 += _F(6.0)
    elif h6 >= _F(6.0):
        h6 -= _F(6.0)
    three = _F(3.0)
    return (lo + span * min(max(abs(abs(h6) - three) - one, zero), one),
            lo + span * min(max(abs(abs(h6 - _F(2.0)) - three) - one, zero), one),
            lo + span * min(max(abs(abs(h6 - _F(4.0)) - three) - one, zero), one))


def _paint(views, order, factor, gray, mean, std, out):
    """views (N, P, 3) uint8 (P pixels of HWC storage); order (N, 4) int64; factor (N, 4) float32 per step;
    gray (N,) bool; mean, std (3,) float32; out (N, 3, P) float32, also the working buffer.

    View by view (in parallel), op by op over the view's planes while they sit in the cache: each op is a
    simple loop the compiler vectorises, and contrast reads the mean grey of the view as it is at its step.
    """
    n, pixels, _ = views.shape
    one, zero, scale = _F(1.0), _F(0.0), _F(1.0 / 255)
    for v in numba.prange(n):
        x = out[v]
        src = views[v]
        for i in range(pixels):
            for c in range(3):
                x[c, i] = src[i, c] * scale
        for step in range(4):
            op, f = order[v, step], factor[v, step]
            if op == BRIGHTNESS:
                for c in range(3):
                    for i in range(pixels):
                        x[c, i] = min(max(x[c, i] * f, zero), one)
            elif op == CONTRAST:
                total = 0.0
                for i in range(pixels):
                    total += x[0, i] * LUMA_R + x[1, i] * LUMA_G + x[2, i] * LUMA_B
                rest = _F(total / pixels) * (one - f)
                for c in range(3):
                    for i in range(pixels):
                        x[c, i] = min(max(x[c, i] * f + rest, zero), one)
            elif op == SATURATION:
                for i in range(pixels):
                    rest = (x[0, i] * LUMA_R + x[1, i] * LUMA_G + x[2, i] * LUMA_B) * (one - f)
                    for c in range(3):
                        x[c, i] = min(max(x[c, i] * f + rest, zero), one)
            elif op == HUE:
                for i in range(pixels):
                    x[0, i], x[1, i], x[2, i] = _hue_pixel(x[0, i], x[1, i], x[2, i], f)
        if gray[v]:
            for i in range(pixels):
                y = x[0, i] * LUMA_R + x[1, i] * LUMA_G + x[2, i] * LUMA_B
                x[0, i] = y
                x[1, i] = y
                x[2, i] = y
        for c in range(3):
            for i in range(pixels):
                x[c, i] = (x[c, i] - mean[c]) / std[c]


if numba is not None:  # compiled on first use, then cached next to this file (or in numba's user cache)
    _hue_pixel = numba.njit(inline="always", cache=True)(_hue_pixel)
    _paint = numba.njit(parallel=True, cache=True, nogil=True)(_paint)


def paint(views: torch.Tensor, jitter: Jitter, mean: list[float], std: list[float]) -> torch.Tensor:
    """(N, 3, H, W) uint8 CPU tensor (any strides) -> (N, 3, H, W) float32: jittered, grayscaled, normalised."""
    n, _, height, width = views.shape
    hwc = views.permute(0, 2, 3, 1).contiguous().numpy()  # free for the reference loader's channels-last views
    step_factor = jitter.step_factors().numpy()
    out = np.empty((n, 3, height * width), dtype=np.float32)
    # As many threads as torch's intra-op setting, so torch.set_num_threads governs the whole stage.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _paint(hwc.reshape(n, height * width, 3), jitter.order.numpy(), step_factor, jitter.gray.numpy(),
           np.asarray(mean, np.float32), np.asarray(std, np.float32), out)
    return torch.from_numpy(out).view(n, 3, height, width)
