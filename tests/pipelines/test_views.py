"""The loader's decode + cut (pipelines/views.py): reduced-scale decoding changes pixels a little, never geometry."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.geometry import dct_reduction, draw_sample_geometry
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.views import decode, eval_view, jpeg_header, pretrain_views

REDUCED = PirlRecipe()
FULL = dataclasses.replace(REDUCED, reduced_decoding=False)
# Measured on the 400 ImageNet photos of imagenet-sample (docs/pipelines.md, "The reference backend"): views
# decoded at 1/2 or 1/4 scale differ from full-resolution ones by 1.06 / 0.73 grey levels on average (mean |diff|
# per view), 4.9 at worst, single pixels up to ~40 at sharp edges; the bounds below leave room for other photos.
MEAN_LEVELS, WORST_VIEW_LEVELS = 2.0, 8.0


def jpeg(h: int, w: int, seed: int = 0, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert("L") if gray else Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_decode_equals_torchvision_and_handles_grey():
    for data in (jpeg(61, 83), jpeg(40, 50, gray=True)):
        ours = decode(data)
        ref = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert ours.shape == ref.shape and torch.equal(ours, ref)
    assert jpeg_header(jpeg(61, 83))[:2] == (61, 83)
    assert decode(jpeg(101, 203), reduction=2).shape == (3, 51, 102)  # libjpeg's ceil(size / 2)


def _views_pair(data: bytes, seed: int):
    a = pretrain_views(data, FULL, torch.Generator().manual_seed(seed))
    b = pretrain_views(data, REDUCED, torch.Generator().manual_seed(seed))
    return a, b


def _level_diffs(a: dict, b: dict) -> list[float]:
    return [(a[k].int() - b[k].int()).abs().float().mean().item() for k in (B.IMAGE, B.PATCHES)]


def test_reduced_decoding_keeps_the_geometry_and_is_close_to_full_decoding():
    data = jpeg(1400, 1800)
    reduced = 0
    for seed in range(6):
        geo = draw_sample_geometry(1400, 1800, REDUCED, torch.Generator().manual_seed(seed))
        reduced += dct_reduction(1400, 1800, geo.crops(REDUCED)) > 1
        a, b = _views_pair(data, seed)
        for key in B.GEOMETRY_KEYS:
            assert torch.equal(a[key], b[key]), key  # geometry never depends on the decoding scale
        assert max(_level_diffs(a, b)) < WORST_VIEW_LEVELS
    assert reduced >= 3  # the case under test happened
    full, fast = eval_view(data, FULL), eval_view(data, REDUCED)
    assert full.shape == fast.shape == (3, 224, 224)
    assert (full.int() - fast.int()).abs().float().mean() < WORST_VIEW_LEVELS


def test_reduced_decoding_on_real_photos(real_data):
    files = sorted((real_data / "imagenet-sample").glob("*.JPEG"))
    diffs = []
    for path in files:
        data = path.read_bytes()
        h, w, _ = jpeg_header(data)
        if min(h, w) < 2 * 224:
            continue  # never reduced: both crops of a smaller photo downscale by less than 2x
        for seed in range(2):
            geo = draw_sample_geometry(h, w, REDUCED, torch.Generator().manual_seed(seed))
            if dct_reduction(h, w, geo.crops(REDUCED)) > 1:
                diffs += _level_diffs(*_views_pair(data, seed))
    assert len(diffs) >= 20
    assert np.mean(diffs) < MEAN_LEVELS and max(diffs) < WORST_VIEW_LEVELS


def test_cmyk_jpeg_falls_back_to_torchvision():
    """simplejpeg cannot convert CMYK to RGB; such a JPEG (tools/make_shards.py re-encodes them, other shard
    writers may not) still decodes, at full scale, through torchvision."""
    pixels = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(out, format="JPEG")
    data = out.getvalue()
    ref = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert torch.equal(decode(data, reduction=2), ref)
    views = pretrain_views(data, REDUCED, torch.Generator().manual_seed(0))
    assert views[B.IMAGE].shape == (3, 224, 224) and views[B.PATCHES].shape == (9, 3, 64, 64)
