"""The batched stage against torchvision.transforms.v2.functional applied to each view alone, for the same draws."""

import dataclasses
import warnings

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pirl_trainer.pipelines import augment
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment, draw_params, rotated_cells
from pirl_trainer.pipelines.batch import check_batch
from pirl_trainer.pipelines.photometric import apply_photometric
from pirl_trainer.pipelines.recipe import PirlRecipe

# A small recipe: 40 px image, 48 px jigsaw crop (cells of 16), 12 px patches. Strengths stay the paper's.
SMALL = PirlRecipe(image_size=40, jigsaw_size=48, patch_size=12)
# float32 on the CPU: torchvision and the stage differ only by rounding (hue takes another, equivalent formula).
# 1e-5 in [0, 1] pixel units, i.e. 1e-5 / std after normalisation.
ATOL = 1e-5 / min(SMALL.std)


def loader_batch(recipe: PirlRecipe, b: int = 24, seed: int = 0, start: int = 100) -> dict:
    """Random uint8 views with flat and grey ones mixed in (the hue and contrast edge cases), channels-last
    like the reference loader's."""
    g = torch.Generator().manual_seed(seed)
    s, k, t = recipe.image_size, recipe.view_tiles, recipe.view_tile_size
    image = torch.randint(0, 256, (b, s, s, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    tiles = torch.randint(0, 256, (b, k, t, t, 3), generator=g, dtype=torch.uint8).permute(0, 1, 4, 2, 3)
    image[0] = image[0, :1]  # a grey image: span 0 everywhere
    image[1] = 128  # a flat image
    tiles[2, 0] = tiles[2, 0, 1:2]  # a grey tile
    image[3, 0] = image[3, 1]  # r == g ties, the hue sector's tie rule
    return {B.IMAGE: image, B.PATCHES: tiles, B.INDEX: torch.arange(start, start + b), B.LABEL: torch.zeros(b).long()}


def reference(batch: dict, recipe: PirlRecipe, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same draws applied one view at a time with torchvision (the per-patch loop the stage replaces)."""
    p = draw_params(recipe, seed, epoch, batch[B.INDEX])
    plans, tile_plans = p.image.plans(), p.tiles.plans()
    b, k = batch[B.PATCHES].shape[:2]
    images, tiles = [], []
    for i in range(b):
        images.append(F.normalize(apply_photometric(batch[B.IMAGE][i].float() / 255, plans[i]), recipe.mean, recipe.std))
        moved = batch[B.PATCHES][i]
        turns = int(p.view_rotation[i])
        if k > 1:
            moved = moved[rotated_cells(recipe.grid, turns)]
        moved = torch.rot90(moved, turns, dims=(-2, -1))
        for j in range(k):
            tile = moved[j]
            if p.tile_flip[i * k + j]:
                tile = F.horizontal_flip(tile)
            tile = torch.rot90(tile, int(p.tile_rotation[i * k + j]), dims=(-2, -1))
            tile = apply_photometric(tile.float() / 255, tile_plans[i * k + j])
            tiles.append(F.normalize(tile, recipe.mean, recipe.std))
    return torch.stack(images), torch.stack(tiles).view(b, k, *tiles[0].shape)


@pytest.mark.parametrize(("kernels", "group_by"), [("numba", None), ("tensor", "order"), ("tensor", "hue")])
@pytest.mark.parametrize("view", ["jigsaw", "rotation", "rotation_jigsaw", "image"])
def test_stage_equals_torchvision_per_view(kernels, group_by, view):
    recipe = dataclasses.replace(SMALL, jigsaw_view=view, patch_flip_p=0.5,
                                 patch_rotation=view not in ("rotation", "image"))
    batch = loader_batch(recipe)
    out = BatchAugment(recipe, seed=5, kernels=kernels, group_by=group_by)(batch, epoch=3)
    check_batch(out, recipe, labelled=True)
    image, tiles = reference(batch, recipe, seed=5, epoch=3)
    torch.testing.assert_close(out[B.IMAGE], image, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[B.PATCHES], tiles, atol=ATOL, rtol=0)
    assert torch.equal(out[B.INDEX], batch[B.INDEX]) and torch.equal(out[B.LABEL], batch[B.LABEL])


def test_compiled_kernels_equal_torchvision(monkeypatch):
    """The kernels really go through torch.compile: a failure to compile falls back to the eager kernels with a
    warning, and those pass the comparison too."""
    recipe = SMALL
    batch = loader_batch(recipe, b=12)
    monkeypatch.setattr(augment, "_COMPILED", {})  # built here, whatever this process compiled before
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    stage = BatchAugment(recipe, seed=1, kernels="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = stage(batch, epoch=0)
    counters = torch._dynamo.utils.counters
    assert stage.compile and counters["stats"]["unique_graphs"] > 0
    assert counters["aot_autograd"]["ok"] == counters["aot_autograd"]["total"] > 0  # handed to inductor, built
    image, tiles = reference(batch, recipe, seed=1, epoch=0)
    torch.testing.assert_close(out[B.IMAGE], image, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[B.PATCHES], tiles, atol=ATOL, rtol=0)


def test_rotation_jigsaw_is_rotating_the_crop_then_tiling():
    """Pixel-exact: the stage's tiles equal cutting the rotated crop at the rotated patch origins."""
    recipe = dataclasses.replace(SMALL, jigsaw_view="rotation_jigsaw", brightness=0, contrast=0, saturation=0,
                                 hue=0, patch_brightness=0, patch_contrast=0, patch_saturation=0, patch_hue=0,
                                 grayscale_p=0, patch_grayscale_p=0)
    g = torch.Generator().manual_seed(2)
    crops = torch.randint(0, 256, (16, 3, 48, 48), generator=g, dtype=torch.uint8)
    origins = torch.tensor([[r * 16 + 2, c * 16 + 3] for r in range(3) for c in range(3)])
    tiles = torch.stack([torch.stack([c[:, y:y + 12, x:x + 12] for y, x in origins.tolist()]) for c in crops])
    batch = {B.IMAGE: crops[:, :, :40, :40], B.PATCHES: tiles, B.INDEX: torch.arange(16)}
    stage = BatchAugment(recipe, seed=0)
    out = stage(batch, epoch=0)[B.PATCHES]
    turns = draw_params(recipe, 0, 0, batch[B.INDEX]).view_rotation
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for i in range(16):
        k = int(turns[i])
        rotated = torch.rot90(crops[i], k, dims=(-2, -1))
        # Where each patch's box lands: rotate a mask of it with the crop.
        expected = []
        for cell in range(9):
            src = int(rotated_cells(3, k)[cell])
            mask = torch.zeros(48, 48, dtype=torch.bool)
            y, x = origins[src].tolist()
            mask[y:y + 12, x:x + 12] = True
            ys, xs = torch.rot90(mask, k).nonzero(as_tuple=True)
            top, left = int(ys.min()), int(xs.min())
            assert top // 16 * 3 + left // 16 == cell  # the rotated patch sits in the cell it is reported in
            expected.append(rotated[:, top:top + 12, left:left + 12])
        want = F.normalize(torch.stack(expected).float() / 255, recipe.mean, recipe.std)
        torch.testing.assert_close(out[i], want, atol=ATOL, rtol=0)


def test_rotation_view_rotates_by_quarter_turns_exactly():
    recipe = dataclasses.replace(SMALL, jigsaw_view="rotation", brightness=0, contrast=0, saturation=0, hue=0,
                                 grayscale_p=0)
    batch = loader_batch(recipe, b=32)
    out = BatchAugment(recipe, seed=4)(batch, epoch=1)[B.PATCHES]
    turns = draw_params(recipe, 4, 1, batch[B.INDEX]).view_rotation
    for i in range(32):
        want = torch.rot90(batch[B.PATCHES][i, 0], int(turns[i]), dims=(-2, -1)).float() / 255
        torch.testing.assert_close(out[i, 0], F.normalize(want, recipe.mean, recipe.std), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernels", ["numba", "tensor"])
def test_draws_depend_on_sample_not_on_batch_or_position(kernels):
    recipe = dataclasses.replace(SMALL, patch_rotation=True, patch_flip_p=0.5)
    batch = loader_batch(recipe, b=12)
    stage = BatchAugment(recipe, seed=9, kernels=kernels)
    whole = stage(batch, epoch=2)
    order = torch.tensor([11, 3, 7, 0, 5])
    part = stage({k: v[order] for k, v in batch.items()}, epoch=2)
    for key in (B.IMAGE, B.PATCHES):
        torch.testing.assert_close(part[key], whole[key][order], atol=1e-6, rtol=0)
    other_epoch = stage(batch, epoch=3)
    assert not torch.allclose(other_epoch[B.PATCHES], whole[B.PATCHES])
    other_seed = BatchAugment(recipe, seed=10)(batch, epoch=2)
    assert not torch.allclose(other_seed[B.IMAGE], whole[B.IMAGE])


def test_eval_form_converts_and_normalises_only():
    batch = loader_batch(SMALL, b=4)
    out = BatchAugment(SMALL).eval({B.IMAGE: batch[B.IMAGE], B.INDEX: batch[B.INDEX]})
    want = F.normalize(batch[B.IMAGE].float() / 255, SMALL.mean, SMALL.std)
    torch.testing.assert_close(out[B.IMAGE], want, atol=1e-6, rtol=0)
    check_batch(out, SMALL, labelled=False, mode="eval")


def test_bad_inputs_are_named():
    batch = loader_batch(SMALL, b=4)
    stage = BatchAugment(SMALL)
    with pytest.raises(TypeError, match="uint8"):
        stage({**batch, B.IMAGE: batch[B.IMAGE].float()}, epoch=0)
    with pytest.raises(ValueError, match="do not match the recipe"):
        stage({**batch, B.PATCHES: batch[B.PATCHES][:, :4]}, epoch=0)
    with pytest.raises(ValueError, match="group_by"):
        BatchAugment(SMALL, group_by="size")
    with pytest.raises(ValueError, match="kernels must be one of"):
        BatchAugment(SMALL, kernels="cuda")
