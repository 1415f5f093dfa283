"""The drawn parameters follow the recipe: ranges, probabilities, orders, independence between views."""

import dataclasses
import math

import pytest
import torch

from pirl_trainer.pipelines.augment import draw_params
from pirl_trainer.pipelines.photometric import BRIGHTNESS, HUE, NONE, apply_photometric, draw_jitter
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.common.rng import counter_uniform

N = 4000  # samples: 36,000 patch draws


@pytest.fixture(scope="module")
def params():
    return draw_params(PirlRecipe(), seed=0, epoch=0, index=torch.arange(N))


def test_counter_uniform_is_uniform_and_a_pure_function_of_key_index_slot():
    u = counter_uniform(12345, torch.arange(20_000), 8)
    assert u.shape == (20_000, 8) and u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u.flatten().float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    # Neighbouring slots and neighbouring samples are uncorrelated.
    assert abs(torch.corrcoef(u[:, :2].T)[0, 1]) < 0.03
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1]) < 0.03
    picked = torch.tensor([19_999, 7, 123])
    assert torch.equal(counter_uniform(12345, picked, 8), u[picked])  # batch composition does not matter
    assert not torch.equal(counter_uniform(12346, picked, 8), u[picked])  # the key does
    with pytest.raises(ValueError, match="non-negative"):
        counter_uniform(1, torch.tensor([-1]), 2)


def test_large_indexes_use_their_high_bits():
    big = torch.tensor([5, 5 + 2**32])
    u = counter_uniform(7, big, 4)
    assert not torch.equal(u[0], u[1])


def test_factor_ranges_and_all_orders(params):
    for jitter, s in ((params.image, 0.4), (params.tiles, 0.4)):
        f = jitter.factor
        assert f[:, :HUE].min() >= 1 - s and f[:, :HUE].max() <= 1 + s
        assert f[:, HUE].abs().max() <= 0.2
        # Uniform on its range: the mean is the centre, the spread that of U[0.6, 1.4].
        assert abs(f[:, BRIGHTNESS].mean().item() - 1.0) < 0.01
        assert abs(f[:, BRIGHTNESS].std().item() - 0.8 / math.sqrt(12)) < 0.01
        orders = {tuple(row) for row in jitter.order.tolist()}
        assert len(orders) == 24  # every order of the four ops occurs (jitter_p = 1: none skipped)


def test_probabilities(params):
    assert abs(params.image.gray.float().mean().item() - 0.2) < 0.02
    assert abs(params.tiles.gray.float().mean().item() - 0.2) < 0.01
    assert not params.tile_flip.any() and not params.tile_rotation.any()  # the paper's jigsaw: neither
    assert not params.view_rotation.any()
    recipe = dataclasses.replace(PirlRecipe(), jigsaw_view="rotation_jigsaw", patch_rotation=True, patch_flip_p=0.5,
                                 patch_jitter_p=0.5)
    p = draw_params(recipe, seed=0, epoch=0, index=torch.arange(N))
    assert abs(p.tile_flip.float().mean().item() - 0.5) < 0.02
    for turns in (p.view_rotation, p.tile_rotation):
        shares = torch.bincount(turns, minlength=4).float() / len(turns)
        assert shares.shape == (4,) and (shares - 0.25).abs().max() < 0.02
    assert abs((p.tiles.order[:, 0] == NONE).float().mean().item() - 0.5) < 0.02  # jitter skipped half the time


def test_patches_draw_independently(params):
    hue = params.tiles.factor[:, HUE].view(N, 9)
    corr = torch.corrcoef(hue.T)  # (9, 9): patch j's hue shift against patch k's, over samples
    assert (corr - torch.eye(9)).abs().max() < 0.06
    assert len(set(hue.flatten().tolist())) == 9 * N  # every patch its own draw
    same_order = (params.tiles.order.view(N, 9, 4)[:, 0] == params.tiles.order.view(N, 9, 4)[:, 1]).all(1)
    assert abs(same_order.float().mean().item() - 1 / 24) < 0.015
    image_vs_patch = torch.corrcoef(torch.stack([params.image.factor[:, HUE], hue[:, 0]]))[0, 1]
    assert abs(image_vs_patch) < 0.06


def test_zero_strength_ops_are_skipped_and_the_rest_keep_their_order():
    u = counter_uniform(3, torch.arange(500), 10)
    j = draw_jitter(u, brightness=0.4, contrast=0.0, saturation=0.4, hue=0.0, jitter_p=1.0, grayscale_p=0.0)
    assert (j.order[:, 2:] == NONE).all() and (j.order[:, :2] != NONE).all()
    assert {tuple(r) for r in j.order[:, :2].tolist()} == {(0, 2), (2, 0)}
    none = draw_jitter(u, brightness=0, contrast=0, saturation=0, hue=0, jitter_p=1.0, grayscale_p=0.0)
    assert none.plans() == [[]] * 500


def test_plans_drive_torchvision():
    u = counter_uniform(4, torch.arange(3), 10)
    j = draw_jitter(u, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, jitter_p=1.0, grayscale_p=1.0)
    plan = j.plans()[0]
    assert [name for name, _ in plan][-1] == "grayscale" and len(plan) == 5
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = apply_photometric(image, plan)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(apply_photometric(image, [("brightness", 1.0)]), image)
