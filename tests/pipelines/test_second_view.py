"""jigsaw_view="image": a second image view, cut like the rotation view and never rotated (SimCLR's and MoCo v2's
two views). Cross-backend equality of its crops: the "image" cases of test_dali_loader, test_ffcv_loader and
test_device_decode (same samples, same JIGSAW_BOX / JIGSAW_FLIPPED as the reference)."""

import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment, draw_params
from pirl_trainer.pipelines.batch import check_batch, check_loader_batch
from pirl_trainer.pipelines.geometry import draw_sample_geometry
from pirl_trainer.pipelines.recipe import JIGSAW_VIEWS, PirlRecipe

from .test_augment import ATOL, SMALL, loader_batch

IMAGE_VIEW = dataclasses.replace(SMALL, jigsaw_view="image")


def test_image_is_a_second_image_view_of_one_tile():
    assert "image" in JIGSAW_VIEWS
    second = {view: PirlRecipe(jigsaw_view=view).validate().second_image_view for view in JIGSAW_VIEWS}
    assert second == {"jigsaw": False, "rotation": True, "rotation_jigsaw": False, "image": True}
    assert (IMAGE_VIEW.view_tiles, IMAGE_VIEW.view_tile_size) == (1, 40)


def test_its_geometry_is_the_rotation_views():
    """Its own crop at the image view's scales and ratios and its own flip: what the rotation view draws."""
    image, rotation = PirlRecipe(jigsaw_view="image"), PirlRecipe(jigsaw_view="rotation")
    flips, boxes = 0, set()
    for seed in range(200):
        a = draw_sample_geometry(375, 500, image, torch.Generator().manual_seed(seed))
        b = draw_sample_geometry(375, 500, rotation, torch.Generator().manual_seed(seed))
        assert (a.image_box, a.image_flipped, a.jigsaw_box, a.jigsaw_flipped) == \
               (b.image_box, b.image_flipped, b.jigsaw_box, b.jigsaw_flipped)
        assert a.patch_origins.tolist() == [[0, 0]]
        assert a.crops(image)[1] == (a.jigsaw_box, image.image_size)
        flips += a.jigsaw_flipped
        boxes.add(a.jigsaw_box)
    assert 60 < flips < 140 and len(boxes) > 150  # flipped about half the time; its boxes vary


def test_its_draws_are_the_rotation_views_without_the_rotation():
    """Never rotated nor patch-flipped, whatever patch_rotation / patch_flip_p say; painted with the image view's
    strengths (the rotation view's tile draws, same slots)."""
    index = torch.arange(0, 4000, 3)
    changes = dict(patch_rotation=True, patch_flip_p=0.5, patch_brightness=0.0, patch_hue=0.0)
    image = draw_params(dataclasses.replace(IMAGE_VIEW, **changes), 1, 5, index)
    rotation = draw_params(dataclasses.replace(SMALL, jigsaw_view="rotation", **changes), 1, 5, index)
    assert not image.view_rotation.any() and set(rotation.view_rotation.tolist()) == {0, 1, 2, 3}
    assert not image.tile_flip.any() and not image.tile_rotation.any()
    for field in ("order", "factor", "gray"):
        assert torch.equal(getattr(image.image, field), getattr(rotation.image, field)), field
        assert torch.equal(getattr(image.tiles, field), getattr(rotation.tiles, field)), field
    assert (image.tiles.factor[:, 0] != 1).any()  # the image view's brightness 0.4, not patch_brightness 0


def test_the_stage_never_rotates_it():
    recipe = dataclasses.replace(IMAGE_VIEW, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0)
    batch = loader_batch(recipe, b=32)
    out = BatchAugment(recipe, seed=4)(batch, epoch=1)
    check_batch(out, recipe, labelled=True)
    want = F.normalize(batch[B.PATCHES].float() / 255, recipe.mean, recipe.std)
    torch.testing.assert_close(out[B.PATCHES], want, atol=ATOL, rtol=0)


def test_loader_batch_contract(small_shards, small_recipe):
    """The reference loader's batches with jigsaw_view="image": one image-sized tile, zero patch origins, its own
    flip; the stage's model batch; a tile origin off zero breaks the contract."""
    recipe = dataclasses.replace(small_recipe, jigsaw_view="image", blur_p=0.5)
    loader = pipelines.make_loader("reference", str(small_shards), recipe, batch_size=8, num_workers=0,
                                   with_geometry=True)
    loader.set_epoch(1)
    flips = []
    for batch in loader:
        check_loader_batch(batch, recipe, labelled=True)
        assert batch[B.PATCHES].shape[1:] == (1, 3, 32, 32) and not batch[B.PATCH_ORIGIN].any()
        assert not torch.equal(batch[B.JIGSAW_BOX], batch[B.IMAGE_BOX])
        flips += batch[B.JIGSAW_FLIPPED].tolist()
        check_batch(BatchAugment(recipe, seed=0)(batch, epoch=1), recipe, labelled=True)
    assert 0 < sum(flips) < len(flips)
    batch[B.PATCH_ORIGIN] = batch[B.PATCH_ORIGIN] + 1
    with pytest.raises(ValueError, match="'patch_origin' of the 'image' view must be zeros"):
        check_loader_batch(batch, recipe, labelled=True)
