import dataclasses

import pytest
import torch

from pirl_trainer.pipelines.geometry import (
    cell_origins, cut_patches, dct_reduction, draw_sample_geometry, sample_patch_origins, sample_resized_crop_box,
)
from pirl_trainer.pipelines.recipe import PirlRecipe


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


@pytest.mark.parametrize("view", ["jigsaw", "rotation", "rotation_jigsaw", "image"])
def test_sample_geometry_per_view(view):
    recipe = PirlRecipe(jigsaw_view=view).validate()
    geo = draw_sample_geometry(375, 500, recipe, gen(3))
    again = draw_sample_geometry(375, 500, recipe, gen(3))  # a pure function of the generator
    assert (geo.image_box, geo.jigsaw_box, geo.image_flipped) == (again.image_box, again.jigsaw_box, again.image_flipped)
    assert torch.equal(geo.patch_origins, again.patch_origins)
    for top, left, h, w in (geo.image_box, geo.jigsaw_box):
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    if view in ("rotation", "image"):
        assert geo.patch_origins.tolist() == [[0, 0]]
        assert geo.crops(recipe)[1][1] == recipe.image_size
    else:
        assert geo.patch_origins.shape == (9, 2) and not geo.jigsaw_flipped
        assert geo.jigsaw_box[2] * geo.jigsaw_box[3] >= 0.6 * 375 * 500 * 0.98  # >= 60 % of the area (rounding)
        assert geo.crops(recipe)[1][1] == recipe.jigsaw_size
    flips = [draw_sample_geometry(375, 500, recipe, gen(s)).image_flipped for s in range(400)]
    assert 0.4 < sum(flips) / 400 < 0.6


@pytest.mark.parametrize(
    ("size", "crops", "expected"),
    [
        ((375, 500), [((0, 0, 375, 500), 224), ((0, 0, 300, 300), 255)], 1),  # 1.18x: full scale
        ((1000, 1000), [((0, 0, 900, 900), 224), ((0, 0, 600, 700), 255)], 2),  # 2.35x and 4.0x: 1/2
        ((2000, 3000), [((0, 0, 1800, 1900), 224), ((0, 0, 1500, 1500), 255)], 4),  # 5.9x, 8.0x: 1/4
        ((4000, 4000), [((0, 0, 4000, 4000), 224)], 8),  # 17.9x: capped at libjpeg's 1/8
        ((1000, 1000), [((0, 0, 1000, 1000), 224), ((0, 0, 300, 300), 255)], 1),  # one crop below 2x
    ],
)
def test_dct_reduction_keeps_every_crop_at_least_its_output_size(size, crops, expected):
    assert dct_reduction(*size, crops) == expected
    for (_, _, h, w), side in crops:
        assert min(h, w) / expected >= side


def test_recipe_view_shapes():
    jig = PirlRecipe()
    assert (jig.view_tiles, jig.view_tile_size) == (9, 64)
    rot = dataclasses.replace(jig, jigsaw_view="rotation")
    assert (rot.view_tiles, rot.view_tile_size) == (1, 224)
    assert dataclasses.replace(jig, jigsaw_view="rotation_jigsaw").view_tiles == 9
    image = dataclasses.replace(jig, jigsaw_view="image").validate()
    assert (image.view_tiles, image.view_tile_size) == (1, 224)
    with pytest.raises(ValueError, match="jigsaw_view='shuffle'"):
        dataclasses.replace(jig, jigsaw_view="shuffle").validate()
