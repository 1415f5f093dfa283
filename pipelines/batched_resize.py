"""Antialiased bilinear crop-and-resize of many crops at once, as batched matrix products on any device.

torch's (and Pillow's, torchvision's) antialiased bilinear resize is separable: a crop (C, h, w) resized to
(H, W) is Wy @ crop @ Wx^T, where row i of Wy (H, h) holds triangle-filter weights centred on the input
coordinate scale * (i + 0.5) (scale = h / H), the support widened to scale input pixels when downscaling (1 when
upscaling), normalised to sum 1: F.interpolate(mode="bilinear", antialias=True, align_corners=False), aten's
_compute_indices_min_size_weights_aa. Crops of different sizes share one batched matmul by zero padding: pixels
beyond a crop meet zero weights. A horizontal flip is Wx with its rows reversed; a centre crop of the resized
view is a window of its rows.

Banded: a row of W has ~2 * max(scale, 1) nonzero weights out of h, so the dense product would do ~100x the
needed work at ImageNet sizes. Output rows are taken in tiles of TILE; the rows of a tile read one window of
input rows, the same length for every tile of the chunk, so each pass is a gather of the windows and one batched
matmul, (TILE x window) @ (window x columns) per crop, channel and tile. Window positions come from the crops'
sizes on the host; nothing is read back from the device.

The arithmetic is float32 (within ~1e-4 grey levels of torch's float kernel on the CPU; a GPU that allows TF32
matmuls, torch.backends.cuda.matmul.allow_tf32, rounds to ~1e-3 relative, a fraction of a grey level), then
rounded to uint8. Memory: the padded float crops of a whole batch would be large (a 256-photo ImageNet batch,
two crops each: GBs), so crops go through in chunks of at most CHUNK_ELEMENTS float32 values, sorted by size so
that a chunk's crops need little padding.
"""

from typing import NamedTuple, Sequence

import numpy as np
import torch

# Float32 values one chunk holds at once (an upper estimate: padded crops, gathered windows, intermediate
# products): 256 MiB. 256 of the ImageNet sample photos (~400 x 480 on average) run in 12 chunks for the image
# views and 14 for the 255 crops; a crop larger than this (up to the decompression-bomb limit,
# pipelines/limits.py) goes alone.
CHUNK_ELEMENTS = 1 << 26
# A crop joins a chunk only while the chunk's padded size is at most this many times its own area: a small crop
# padded to a large one's size would cost the large one's multiply-adds.
MAX_PADDING = 2.0
# Output rows per tile: a tile's window holds ~TILE * scale + 6 input rows, so smaller tiles do fewer multiply-adds
# and gather more overlapping rows. Measured on one CPU core, batches of 32 ImageNet photos at 224 / 255: 16 and 24
# fastest, 32 ~10% and 48 ~30% slower, 8 slower again; one tile of 256 rows (the dense product) ~3x slower.
TILE = 16


class Crop(NamedTuple):
    """One view to cut: `box` of image `source`, resized to `resize`, of which `size` (resized_crops' argument)
    rows and columns are kept from `window` on, flipped left-right when `flipped`."""

    source: int  # position of the image in resized_crops' `images`
    box: tuple[int, int, int, int]  # (top, left, h, w) in that image
    resize: tuple[int, int]  # (height, width) the box is resized to
    window: tuple[int, int] = (0, 0)  # (y, x) of the kept window in the resized box (a centre crop's offsets)
    flipped: bool = False  # horizontal flip of the kept window


def tile_weights(in_size: torch.Tensor, out_size: torch.Tensor, first: torch.Tensor, count: int, tile: int,
                 starts: torch.Tensor, length: int, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """(n, tiles, tile, length) float32 weights: [k, t, a, b] weighs input pixel starts[k, t] + b for output row
    t * tile + a of rows first[k] .. first[k] + count - 1 of the antialiased bilinear resize of in_size[k] pixels
    to out_size[k] (torch's align_corners=False arithmetic), rows reversed where flipped[k]. Zero beyond
    in_size[k] and for rows past `count`. Each window must hold every nonzero weight of its rows (tile_windows).
    Inputs are (n,) tensors (starts (n, tiles)) on the device the weights are built on."""
    device = in_size.device
    n, tiles = starts.shape
    in_size, out_size = in_size.to(torch.float32)[:, None, None, None], out_size.to(torch.float32)[:, None, None, None]
    scale = in_size / out_size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle's half-width in input pixels: widened when downscaling
    emitted = torch.arange(tiles * tile, device=device).view(1, tiles, tile, 1)
    if flipped is not None:
        emitted = torch.where(flipped[:, None, None, None], count - 1 - emitted, emitted)
    center = scale * (first[:, None, None, None] + emitted + 0.5)  # (n, tiles, tile, 1)
    taps = starts[:, :, None, None] + torch.arange(length, device=device)  # (n, tiles, 1, length)
    weights = (1.0 - ((taps + 0.5 - center) / support).abs()).clamp(min=0.0)
    weights = weights * ((taps < in_size) & (emitted >= 0) & (emitted < count))
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)  # rows past `count` stay zero


def resize_weights(in_size: torch.Tensor, out_size: torch.Tensor, first: torch.Tensor, count: int, pad_to: int,
                   flipped: torch.Tensor | None = None) -> torch.Tensor:
    """(n, count, pad_to) the dense form of tile_weights (one tile, every input pixel): row i weighs the pixels
    0 .. pad_to - 1 for output row first[k] + i of the resize of in_size[k] pixels to out_size[k]."""
    starts = torch.zeros(len(in_size), 1, dtype=torch.int64, device=in_size.device)
    return tile_weights(in_size, out_size, first, count, count, starts, pad_to, flipped)[:, 0]


def tile_windows(in_size: np.ndarray, out_size: np.ndarray, first: np.ndarray, count: int, flipped: np.ndarray,
                 pad_to: int, tile: int = TILE) -> tuple[np.ndarray, int]:
    """(starts (n, tiles), length): the window of input pixels each tile of output rows reads, one length for all,
    every window inside [0, pad_to). Host arithmetic, one pixel wider on each side than the nonzero weights
    (so that float rounding on the device cannot put a weight outside it)."""
    tiles = -(-count // tile)
    emitted = np.minimum(np.arange(tiles * tile), count - 1)  # rows past `count` repeat the last one
    rows = first[:, None] + np.where(flipped[:, None], count - 1 - emitted, emitted)  # (n, tiles * tile)
    scale = (in_size / out_size)[:, None]
    support = np.maximum(scale, 1.0)
    center = scale * (rows + 0.5)
    lo = np.clip(np.floor(center - support) - 1, 0, None).reshape(len(rows), tiles, tile).min(-1)
    hi = np.minimum(np.ceil(center + support) + 2, in_size[:, None]).reshape(len(rows), tiles, tile).max(-1)
    length = int((hi - lo).max())
    if length >= pad_to:
        return np.zeros((len(rows), tiles), dtype=np.int64), pad_to
    return np.minimum(lo, pad_to - length).astype(np.int64), length


def _row_weights(in_size, out_size, first, count: int, flipped, pad_to: int, device):
    """(starts (n, tiles) host, window length, weights (n, tiles, TILE, length) on `device`) of the resize of
    dimension `pad_to` long to `count` rows, for per-crop host arrays of sizes."""
    starts, length = tile_windows(in_size, out_size, first, count, flipped, pad_to, TILE)

    def column(values, dtype=torch.int64):
        return torch.as_tensor(values, dtype=dtype).to(device)

    weights = tile_weights(column(in_size), column(out_size), column(first), count, TILE, column(starts), length,
                           column(flipped, torch.bool))
    return starts, length, weights


def _apply(weights: torch.Tensor, windows: torch.Tensor, count: int) -> torch.Tensor:
    """(n, tiles, TILE, L) weights, (n, C, tiles * L, R) windows -> (n, C, count, R): one batched matmul."""
    n, tiles, _, length = weights.shape
    out = weights[:, None] @ windows.view(n, windows.shape[1], tiles, length, -1)  # (n, C, tiles, TILE, R)
    return out.view(n, windows.shape[1], tiles * TILE, -1)[:, :, :count]


def _resize_rows(x: torch.Tensor, in_size, out_size, first, count: int, flipped) -> torch.Tensor:
    """(n, C, P, R) float -> (n, C, count, R): the resize along dimension 2, for per-crop host arrays of sizes.

    Along dimension 2 each tile's window is a run of whole rows (contiguous memory), so gathering the windows is a
    row copy and the product a plain batched matmul (tile x window) @ (window x R)."""
    n, channels, pad_to, _ = x.shape
    starts, length, weights = _row_weights(in_size, out_size, first, count, flipped, pad_to, x.device)
    rows = np.arange(n * channels).reshape(n, channels, 1) * pad_to + _window_rows(starts, length)[:, None]
    windows = x.reshape(n * channels * pad_to, -1).index_select(0, torch.as_tensor(rows.reshape(-1)).to(x.device))
    return _apply(weights, windows.view(n, channels, -1, x.shape[3]), count)


def _window_rows(starts: np.ndarray, length: int) -> np.ndarray:
    """(n, tiles * length): the rows each crop's windows read, tile after tile."""
    return (starts[:, :, None] + np.arange(length)).reshape(len(starts), -1)


def chunk_elements(n: int, channels: int, height: int, width: int, size: tuple[int, int]) -> int:
    """Float32 values a chunk of n crops padded to (height, width), cut to `size`, holds at once (an upper
    estimate: the padded crops, a pass's gathered windows, its product and its transposed copy)."""
    return 4 * n * channels * max(height, size[0] + TILE) * max(width, size[1] + TILE)


def plan_chunks(crops: Sequence[Crop], channels: int, size: tuple[int, int],
                budget: int = CHUNK_ELEMENTS) -> list[list[int]]:
    """Positions of `crops` in chunks: largest crops first, each chunk as long as its padded floats fit the
    budget and pad no crop beyond MAX_PADDING times its area (a chunk always takes at least one crop)."""
    order = sorted(range(len(crops)), key=lambda k: crops[k].box[2] * crops[k].box[3], reverse=True)
    chunks: list[list[int]] = []
    height = width = 0
    for k in order:
        h, w = crops[k].box[2:]
        grown_h, grown_w = max(height, h), max(width, w)
        if (chunks and grown_h * grown_w <= MAX_PADDING * h * w
                and chunk_elements(len(chunks[-1]) + 1, channels, grown_h, grown_w, size) <= budget):
            chunks[-1].append(k)
            height, width = grown_h, grown_w
        else:
            chunks.append([k])
            height, width = h, w
    return chunks


def resized_crops(images: Sequence[torch.Tensor], crops: Sequence[Crop], size: tuple[int, int],
                  budget: int = CHUNK_ELEMENTS, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(len(crops), C, *size) uint8: every crop of `crops` cut from its (C, H, W) uint8 image, resized with
    antialiased bilinear weights, windowed and flipped, on the images' device; dtype=torch.float32 gives the
    values before rounding.

    Host values only (the crops' boxes and sizes); nothing is read back from the device.
    """
    if not crops:
        raise ValueError("resized_crops needs at least one crop")
    device, channels = images[0].device, images[0].shape[0]
    out_h, out_w = size
    out = torch.empty(len(crops), channels, out_h, out_w, dtype=dtype, device=device)
    for chunk in plan_chunks(crops, channels, size, budget):
        picked = [crops[k] for k in chunk]
        n = len(picked)
        height = max(c.box[2] for c in picked)
        width = max(c.box[3] for c in picked)
        box = np.array([c.box for c in picked], dtype=np.int64)
        resize = np.array([c.resize for c in picked], dtype=np.int64)
        window = np.array([c.window for c in picked], dtype=np.int64)
        flipped = np.array([c.flipped for c in picked], dtype=bool)
        # Height first, then width: each pass resizes dimension 2 of a (n, C, rows, columns) tensor. The first
        # pass reads its windows straight from the images (no padded copy of the crops); rows past a crop repeat
        # its last row (finite values for zero weights).
        starts, length, weights = _row_weights(box[:, 2], resize[:, 0], window[:, 0], out_h,
                                               np.zeros(n, dtype=bool), height, device)
        rows = np.minimum(_window_rows(starts, length), box[:, 2:3] - 1) + box[:, :1]  # (n, tiles * length)
        rows_t = torch.as_tensor(rows).to(device)
        windows = torch.empty(n, channels, rows.shape[1], width, device=device)
        for k, c in enumerate(picked):
            _, left, _, w = c.box
            windows[k, :, :, :w] = images[c.source][:, :, left:left + w].index_select(1, rows_t[k])
            windows[k, :, :, w:] = 0  # padding: zero weights meet it, and 0 * an uninitialised NaN is NaN
        half = _apply(weights, windows, out_h)  # (n, C, out_h, width)
        resized = _resize_rows(half.transpose(2, 3).contiguous(), box[:, 3], resize[:, 1], window[:, 1], out_w,
                               flipped).transpose(2, 3)  # (n, C, out_h, out_w)
        if dtype == torch.uint8:
            resized = resized.round_().clamp_(0, 255)
        out[torch.as_tensor(chunk).to(device)] = resized.to(dtype)
    return out
