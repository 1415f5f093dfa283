import math

import pytest
import torch

from pipelines.geometry import cell_origins, cut_patches, sample_patch_origins, sample_resized_crop_box
from pipelines.photometric import apply_photometric, sample_photometric


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_full_scale_square_crop_is_the_whole_image():
    assert sample_resized_crop_box(100, 100, (1.0, 1.0), (1.0, 1.0), gen()) == (0, 0, 100, 100)


@pytest.mark.parametrize(("h", "w", "box"), [(10, 100, (0, 45, 10, 10)), (100, 10, (45, 0, 10, 10))])
def test_impossible_crop_falls_back_to_the_clamped_centre_crop(h, w, box):
    # Area >= 90% with aspect 1 cannot fit a 10-px-wide strip: all 10 tries fail.
    assert sample_resized_crop_box(h, w, (0.9, 1.0), (1.0, 1.0), gen()) == box


def test_crop_boxes_respect_scale_ratio_and_bounds():
    g = gen(1)
    height, width = 300, 400
    for _ in range(300):
        top, left, h, w = sample_resized_crop_box(height, width, (0.6, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding to whole pixels moves area and aspect a little; the fallback is the centre crop.
        assert h * w >= 0.6 * height * width * 0.98 or (top, left, h, w) == (0, 0, 300, 400)
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02


def test_crop_positions_cover_the_image():
    g = gen(2)
    tops = {sample_resized_crop_box(100, 100, (0.25, 0.25), (1.0, 1.0), g)[0] for _ in range(400)}
    assert min(tops) == 0 and max(tops) == 50  # 50x50 crops: top in 0..50, both ends reachable


def test_cell_origins_row_major():
    assert cell_origins(3, 85).tolist() == [
        [0, 0], [0, 85], [0, 170], [85, 0], [85, 85], [85, 170], [170, 0], [170, 85], [170, 170]]


def test_patch_origins_without_room_are_the_cell_corners():
    assert torch.equal(sample_patch_origins(3, 85, 85, gen()), cell_origins(3, 85))


def test_patch_offsets_span_zero_to_cell_minus_patch_inclusive():
    g = gen(3)
    offsets = torch.stack([sample_patch_origins(3, 85, 64, g) - cell_origins(3, 85) for _ in range(200)])
    assert offsets.dtype == torch.int64 and offsets.shape == (200, 9, 2)
    assert offsets.min() == 0 and offsets.max() == 21  # paper A.1 geometry: 85 - 64 = 21
    assert not torch.equal(offsets[:, 0], offsets[:, 1])  # drawn independently per patch


def test_patch_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        sample_patch_origins(3, 10, 11, gen())


def test_cut_patches_known_values():
    crop = torch.arange(3 * 6 * 6).view(3, 6, 6)
    patches = cut_patches(crop, torch.tensor([[0, 0], [3, 3], [1, 2]]), 3)
    assert patches.shape == (3, 3, 3, 3)
    assert patches[0, 0, 0].tolist() == [0, 1, 2]
    assert patches[1, 0, 0].tolist() == [21, 22, 23]
    assert patches[2, 1, 2].tolist() == [36 + 3 * 6 + 2, 36 + 3 * 6 + 3, 36 + 3 * 6 + 4]


def _plans(n, seed=0, **kw):
    args = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, jitter_p=1.0, grayscale_p=0.2)
    args.update(kw)
    return sample_photometric(n, generator=gen(seed), **args)


def test_zero_strengths_draw_no_ops():
    assert _plans(9, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0) == [[]] * 9
    assert _plans(9, jitter_p=0, grayscale_p=0) == [[]] * 9


def test_jitter_factors_in_range_in_random_order():
    plans = _plans(500, grayscale_p=0)
    orders = {tuple(name for name, _ in ops) for ops in plans}
    assert len(orders) == 24  # all 4! orders of brightness/contrast/saturation/hue occur
    for ops in plans:
        for name, factor in ops:
            assert (-0.2 <= factor <= 0.2) if name == "hue" else (0.6 <= factor <= 1.4)
    hue = [f for ops in plans for name, f in ops if name == "hue"]
    assert len(set(hue)) == 500  # every patch its own draw


def test_grayscale_probability_and_effect():
    plans = _plans(2000, seed=1)
    share = sum(ops[-1][0] == "grayscale" for ops in plans) / len(plans)
    assert math.isclose(share, 0.2, abs_tol=0.03)
    image = torch.rand(3, 8, 8, generator=gen(4))
    grey = apply_photometric(image, [("grayscale", 0.0)])
    assert grey.shape == (3, 8, 8) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_photometric_is_a_function_of_the_generator():
    assert _plans(9, seed=7) == _plans(9, seed=7)
    assert _plans(9, seed=7) != _plans(9, seed=8)
    image = torch.rand(3, 8, 8, generator=gen(5))
    (ops,) = _plans(1, seed=9)
    out = apply_photometric(image, ops)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, apply_photometric(image, ops))
    assert torch.equal(apply_photometric(image, [("brightness", 1.0)]), image)
