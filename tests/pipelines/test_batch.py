import pytest
import torch

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batch import check_batch, check_loader_batch
from pirl_trainer.pipelines.geometry import cell_origins


def valid(recipe, b=3):
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(recipe.mean).view(3, 1, 1)
    std = torch.tensor(recipe.std).view(3, 1, 1)
    s, p = recipe.image_size, recipe.patch_size
    return {
        B.IMAGE: (torch.rand(b, 3, s, s, generator=g) - mean) / std,
        B.PATCHES: (torch.rand(b, 9, 3, p, p, generator=g) - mean) / std,
        B.INDEX: torch.arange(b, dtype=torch.int64) + 10,
        B.LABEL: torch.zeros(b, dtype=torch.int64),
        B.PATCH_ORIGIN: cell_origins(3, recipe.cell_size).expand(b, 9, 2).clone(),
    }


def test_valid_batch_passes(small_recipe):
    check_batch(valid(small_recipe), small_recipe, labelled=True)
    eval_batch = {k: v for k, v in valid(small_recipe).items() if k in (B.IMAGE, B.INDEX)}
    check_batch(eval_batch, small_recipe, labelled=False, mode="eval")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda b: b.pop(B.LABEL), "missing keys \\['label'\\]"),
        (lambda b: b.update(extra=torch.zeros(3)), "unexpected keys \\['extra'\\]"),
        (lambda b: b.update(image=b[B.IMAGE] * 255), "outside the normalised range"),
        (lambda b: b.update(image=b[B.IMAGE].half()), "'image' has dtype torch.float16"),
        (lambda b: b.update(patches=b[B.PATCHES][:, :8]), "'patches' has shape"),
        (lambda b: b.update(index=torch.tensor([1, 1, 2])), "duplicate"),
        (lambda b: b.update(index=b[B.INDEX].int()), "'index' has dtype torch.int32"),
        (lambda b: b[B.IMAGE].__setitem__((0, 0, 0, 0), float("nan")), "non-finite"),
        (lambda b: b[B.PATCH_ORIGIN].__setitem__((0, 4, 0), 0), "outside its grid cell"),
    ],
)
def test_breakages_are_named(small_recipe, breakage, message):
    batch = valid(small_recipe)
    breakage(batch)
    with pytest.raises(ValueError, match=message):
        check_batch(batch, small_recipe, labelled=True)


def test_label_must_be_absent_when_unlabelled(small_recipe):
    with pytest.raises(ValueError, match="unexpected keys \\['label'\\]"):
        check_batch(valid(small_recipe), small_recipe, labelled=False)


def loader_valid(recipe, b=3):
    g = torch.Generator().manual_seed(0)
    s, p = recipe.image_size, recipe.patch_size
    return {
        B.IMAGE: torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8),
        B.PATCHES: torch.randint(0, 256, (b, 9, 3, p, p), generator=g, dtype=torch.uint8),
        B.INDEX: torch.arange(b, dtype=torch.int64),
    }


def test_loader_contract_is_uint8(small_recipe):
    batch = loader_valid(small_recipe)
    check_loader_batch(batch, small_recipe, labelled=False)
    with pytest.raises(ValueError, match="'image' has dtype torch.uint8, expected torch.float32"):
        check_batch(batch, small_recipe, labelled=False)
    batch[B.PATCHES] = batch[B.PATCHES].float()
    with pytest.raises(ValueError, match="'patches' has dtype torch.float32, expected torch.uint8"):
        check_loader_batch(batch, small_recipe, labelled=False)


@pytest.mark.parametrize("view", ["rotation", "image"])
def test_second_image_views_have_one_image_sized_tile(small_recipe, view):
    import dataclasses

    recipe = dataclasses.replace(small_recipe, jigsaw_view=view)
    batch = loader_valid(small_recipe)
    with pytest.raises(ValueError, match="'patches' has shape"):
        check_loader_batch(batch, recipe, labelled=False)
    s = recipe.image_size
    batch[B.PATCHES] = torch.zeros(3, 1, 3, s, s, dtype=torch.uint8)
    check_loader_batch(batch, recipe, labelled=False)
