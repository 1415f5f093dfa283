"""The Gaussian blur (pipelines/blur.py) against torchvision's gaussian_blur, its draws, and the batched stage with it:
every kernel choice blurs, blur_p = 0 changes nothing, and the stage's older draws are the same as before the blur."""

import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pirl_trainer.pipelines import augment, blur
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment, draw_params
from pirl_trainer.pipelines.batch import check_batch
from pirl_trainer.pipelines.blur import Blur, blur_in_place, blur_views, draw_blur, gaussian_kernels, kernel_size
from pirl_trainer.pipelines.photometric import NONE, apply_photometric
from pirl_trainer.pipelines.recipe import PirlRecipe

from .test_augment import ATOL, SMALL, loader_batch

# float32 blur of [0, 1] values: separable passes against torchvision's 2-D kernel differ by rounding only.
BLUR_ATOL = 1e-5
SIGMAS = [0.1, 0.3, 0.75, 1.0, 1.6, 2.0]  # the extremes of U[0.1, 2.0] included
BLURRED = dataclasses.replace(SMALL, blur_p=0.5)  # 40 px views: 5 px kernels


def torchvision_blur(views: torch.Tensor, sigma: list[float], size: int) -> torch.Tensor:
    return torch.stack([F.gaussian_blur(v, kernel_size=[size, size], sigma=[s, s]) for v, s in zip(views, sigma)])


@pytest.mark.parametrize(("side", "size"), [(40, 5), (40, 23), (40, 39), (224, 23)])
def test_blur_equals_torchvision_per_view(side, size):
    """Each view with its own sigma in one call, against torchvision one view at a time; 39 px on 40 px views is
    the largest kernel reflect padding allows."""
    g = torch.Generator().manual_seed(side + size)
    views = torch.rand(len(SIGMAS), 3, side, side, generator=g)
    views[0] = 0.5  # a flat view stays flat
    ours = blur_views(views, torch.tensor(SIGMAS, dtype=torch.float64), size)
    want = torchvision_blur(views, SIGMAS, size)
    torch.testing.assert_close(ours, want, atol=BLUR_ATOL, rtol=0)
    torch.testing.assert_close(ours[0], torch.full_like(ours[0], 0.5), atol=1e-6, rtol=0)
    # Not the identity: a 2.0 px blur changes a noise view by far more than the tolerance.
    assert (ours[-1] - views[-1]).abs().max() > 0.1


def test_blur_equals_torchvision_on_non_square_views():
    views = torch.rand(2, 3, 20, 33, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(blur_views(views, torch.tensor([0.4, 1.9], dtype=torch.float64), 7),
                               torchvision_blur(views, [0.4, 1.9], 7), atol=BLUR_ATOL, rtol=0)


def test_gaussian_kernels_known_values():
    k = gaussian_kernels(torch.tensor([1.0, 0.1], dtype=torch.float64), 3)
    e = torch.exp(torch.tensor(-0.5))  # exp(-d^2 / (2 sigma^2)) at d = 1, sigma = 1
    torch.testing.assert_close(k[0], torch.stack([e, torch.tensor(1.0), e]) / (1 + 2 * e))
    torch.testing.assert_close(k[1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-20, rtol=0)  # exp(-50): a delta
    torch.testing.assert_close(k.sum(1), torch.ones(2))


@pytest.mark.parametrize(("side", "fraction", "size"), [(224, 0.1, 23), (32, 0.1, 3), (40, 0.1, 5), (96, 0.1, 9),
                                                         (10, 0.1, 1), (100, 0.29, 29), (40, 1.0, 41)])
def test_kernel_size_is_simclrs_odd_tenth_of_the_side(side, fraction, size):
    assert kernel_size(side, fraction) == size


def test_blur_rejects_impossible_kernels():
    views = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="odd"):
        blur_views(views, torch.ones(1), 4)
    with pytest.raises(ValueError, match="larger than 8 px"):
        blur_views(views, torch.ones(1), 17)


def test_blur_in_place_touches_only_the_chosen_views():
    views = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = views.clone()
    chosen = torch.tensor([True, False, False, True, False, True])
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    out = blur_in_place(views, Blur(chosen, sigma), 5)
    assert out is views
    assert torch.equal(views[~chosen], before[~chosen])  # bit for bit
    torch.testing.assert_close(views[chosen], torchvision_blur(before[chosen], sigma[chosen].tolist(), 5),
                               atol=BLUR_ATOL, rtol=0)
    blur_in_place(views, Blur.none(6), 5)  # nothing chosen, or a 1 px kernel: untouched
    blur_in_place(views, Blur(torch.ones(6, dtype=torch.bool), sigma), 1)
    assert torch.equal(views[~chosen], before[~chosen])
    with pytest.raises(ValueError, match="5 blur draws for 6 views"):
        blur_in_place(views, Blur.none(5), 5)


@pytest.mark.parametrize("p", [0.2, 0.5, 1.0])
def test_draws_blur_with_probability_p_and_uniform_sigma(p):
    recipe = dataclasses.replace(SMALL, blur_p=p, blur_sigma_min=0.3, blur_sigma_max=1.7)
    index = torch.arange(20_000)
    image, second = draw_blur(recipe, seed=1, epoch=4, index=index)
    for drawn in (image, second):
        # Binomial share: standard deviation <= 0.0036 at 20 000 samples, so 0.015 is > 4 of them.
        assert abs(drawn.apply.float().mean().item() - p) < 0.015
        assert drawn.sigma.min() >= 0.3 and drawn.sigma.max() <= 1.7
        assert abs(drawn.sigma.mean().item() - 1.0) < 0.01  # U[0.3, 1.7]: mean 1.0, sd of the mean 0.003
        assert drawn.sigma.min() < 0.31 and drawn.sigma.max() > 1.69
    if p < 1:  # the two views' coins are independent: P(both) = p^2
        both = (image.apply & second.apply).float().mean().item()
        assert abs(both - p * p) < 0.015
    assert not torch.equal(image.sigma, second.sigma)


def test_blur_coins_are_independent_of_the_stages_other_draws():
    """Their own stream: a blur coin is not the jitter coin (or any other draw) of the same view under another name."""
    recipe = dataclasses.replace(SMALL, jigsaw_view="image", blur_p=0.5, jitter_p=0.5)
    index = torch.arange(20_000)
    p = draw_params(recipe, seed=0, epoch=0, index=index)
    for jitter, drawn in ((p.image, p.image_blur), (p.tiles, p.tile_blur)):
        jittered = jitter.order[:, 0] != NONE  # NONE first: the view skipped its jitter
        assert abs(jittered.float().mean().item() - 0.5) < 0.015
        assert abs((jittered & drawn.apply).float().mean().item() - 0.25) < 0.015
        assert abs(torch.corrcoef(torch.stack([jitter.factor[:, 0], drawn.sigma]))[0, 1].item()) < 0.03


def test_blur_draws_are_per_sample_and_per_epoch():
    index = torch.tensor([5, 900, 31, 77])
    image, second = draw_blur(BLURRED, seed=2, epoch=1, index=index)
    part, _ = draw_blur(BLURRED, seed=2, epoch=1, index=index[[2, 0]])  # another batch, another order
    assert torch.equal(part.sigma, image.sigma[[2, 0]]) and torch.equal(part.apply, image.apply[[2, 0]])
    other, _ = draw_blur(BLURRED, seed=2, epoch=2, index=index)
    assert not torch.equal(other.sigma, image.sigma)
    none_image, none_second = draw_blur(SMALL, seed=2, epoch=1, index=index)  # blur_p = 0: nothing drawn
    assert not none_image.apply.any() and not none_second.apply.any()


def reference_with_blur(batch: dict, recipe: PirlRecipe, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One view at a time with torchvision, in SimCLR's order: colour, grayscale, blur on [0, 1], normalise. For a
    second image view (It = one tile, maybe rotated)."""
    p = draw_params(recipe, seed, epoch, batch[B.INDEX])
    size = kernel_size(recipe.image_size, recipe.blur_kernel_fraction)

    def paint(view: torch.Tensor, plan, drawn: Blur, i: int) -> torch.Tensor:
        x = apply_photometric(view.float() / 255, plan)
        if drawn.apply[i]:
            x = F.gaussian_blur(x, kernel_size=[size, size], sigma=[float(drawn.sigma[i])] * 2)
        return F.normalize(x, recipe.mean, recipe.std)

    plans, tile_plans = p.image.plans(), p.tiles.plans()
    images, tiles = [], []
    for i in range(len(batch[B.INDEX])):
        images.append(paint(batch[B.IMAGE][i], plans[i], p.image_blur, i))
        tile = torch.rot90(batch[B.PATCHES][i, 0], int(p.view_rotation[i]), dims=(-2, -1))
        tiles.append(paint(tile, tile_plans[i], p.tile_blur, i))
    return torch.stack(images), torch.stack(tiles).unsqueeze(1)


@pytest.mark.parametrize(("kernels", "group_by"), [("numba", None), ("tensor", "order"), ("tensor", "hue"),
                                                   ("compiled", None)])
@pytest.mark.parametrize("view", ["image", "rotation"])
@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_stage_with_blur_equals_torchvision_per_view(monkeypatch, kernels, group_by, view, fraction):
    """Every kernel choice blurs (the compiled choice with its kernels run eagerly here: the blur pass is the same
    for all, and test_augment compiles them for real). fraction 0.5: 21 px kernels on the 40 px views."""
    if kernels == "compiled":
        monkeypatch.setattr(augment, "compiled_kernels", lambda: augment.KERNELS)
    recipe = dataclasses.replace(BLURRED, jigsaw_view=view, blur_kernel_fraction=fraction)
    batch = loader_batch(recipe, b=32)
    out = BatchAugment(recipe, seed=3, kernels=kernels, group_by=group_by)(batch, epoch=2)
    check_batch(out, recipe, labelled=True)
    p = draw_params(recipe, 3, 2, batch[B.INDEX])
    assert 0 < p.image_blur.apply.sum() < 32 and 0 < p.tile_blur.apply.sum() < 32  # both kinds of view present
    image, tiles = reference_with_blur(batch, recipe, seed=3, epoch=2)
    torch.testing.assert_close(out[B.IMAGE], image, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[B.PATCHES], tiles, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_stage_blurs_with_the_extreme_sigmas(sigma):
    recipe = dataclasses.replace(BLURRED, jigsaw_view="image", blur_p=1.0, blur_sigma_min=sigma,
                                 blur_sigma_max=sigma, blur_kernel_fraction=0.3)
    batch = loader_batch(recipe, b=8)
    out = BatchAugment(recipe, seed=0, kernels="tensor")(batch, epoch=0)
    image, tiles = reference_with_blur(batch, recipe, seed=0, epoch=0)
    torch.testing.assert_close(out[B.IMAGE], image, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[B.PATCHES], tiles, atol=ATOL, rtol=0)


@pytest.mark.parametrize("view", ["jigsaw", "rotation", "rotation_jigsaw", "image"])
def test_blur_p_zero_runs_no_blur_and_changes_nothing(monkeypatch, view):
    """blur_p = 0 never reaches the blur (it would raise here); blur_p > 0 leaves the unblurred views bit for bit
    as blur_p = 0 paints them, changes the blurred ones, and never blurs jigsaw patches."""
    recipe = dataclasses.replace(SMALL, jigsaw_view=view, patch_flip_p=0.5, patch_rotation=view == "jigsaw")
    batch = loader_batch(recipe, b=16)
    stage = BatchAugment(recipe, seed=7, kernels="tensor")
    params = draw_params(recipe, 7, 1, batch[B.INDEX])

    def refuse(*args, **kwargs):
        raise AssertionError("blur ran with blur_p = 0")

    with monkeypatch.context() as m:
        m.setattr(augment, "blur_in_place", refuse)
        m.setattr(blur, "counter_uniform", refuse)
        sharp = stage(batch, epoch=1)
    assert torch.equal(sharp[B.IMAGE], stage.paint(batch[B.IMAGE], params.image))  # painting alone, bit for bit
    blurred = BatchAugment(dataclasses.replace(recipe, blur_p=0.5), seed=7, kernels="tensor")(batch, epoch=1)
    chosen = draw_blur(dataclasses.replace(recipe, blur_p=0.5), 7, 1, batch[B.INDEX])
    for key, drawn in ((B.IMAGE, chosen[0]), (B.PATCHES, chosen[1])):
        if key == B.PATCHES and view not in ("rotation", "image"):
            assert torch.equal(blurred[key], sharp[key])  # jigsaw patches: never blurred
            continue
        assert 0 < drawn.apply.sum() < 16
        assert torch.equal(blurred[key][~drawn.apply], sharp[key][~drawn.apply])
        flat = sharp[key].flatten(1).std(1) < 1e-3  # loader_batch's flat views: a blur cannot change them
        # sigma near 0.1 px is a delta kernel (neighbour weight exp(-50)): those views barely change
        chosen_varied = drawn.apply & ~flat.view(-1) & (drawn.sigma > 0.5)
        assert chosen_varied.any()
        diff = (blurred[key][chosen_varied] - sharp[key][chosen_varied]).flatten(1).abs().amax(1)
        assert (diff > 0.05).all()


# draw_params of the recipes that existed before the blur and the "image" view, recorded from that code:
# seed 3, epoch 2, samples (0, 7, 12345), PirlRecipe defaults with patch_flip_p=0.5, patch_rotation on the jigsaw
# views. The jigsaw views share their draws; the rotation view's tiles take the image view's strengths.
KNOWN_IMAGE_FACTOR_0 = [0.7258075136691331, 1.262724575586617, 0.7329013753682374, -0.06316562388092281]
KNOWN_IMAGE_ORDER = [[3, 0, 1, 2], [2, 0, 3, 1], [3, 0, 1, 2]]
KNOWN = {
    "jigsaw": dict(
        tile_factor_1=[1.2316590402275325, 1.3841995000839233, 1.1286934351548552, -0.1947148093022406],
        tile_flip=[0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0],
        tile_rotation=[2, 0, 1, 2, 2, 2, 0, 1, 2, 0, 2, 3, 2, 0, 2, 3, 3, 0, 3, 1, 3, 2, 2, 3, 3, 2, 1],
        view_rotation=[0, 0, 0], sums=(8.53774921465665, 80.34181628935039)),
    "rotation": dict(
        tile_factor_1=[0.9120999947190285, 0.9303988093510269, 0.630329667776823, -0.11856096768751741],
        tile_flip=[0, 0, 0], tile_rotation=[0, 0, 0], view_rotation=[2, 2, 1],
        sums=(8.53774921465665, 7.716760861687362)),
}
KNOWN["rotation_jigsaw"] = dict(KNOWN["jigsaw"], view_rotation=[2, 2, 1])


@pytest.mark.parametrize("view", sorted(KNOWN))
@pytest.mark.parametrize("blur_p", [0.0, 0.5])
def test_existing_draws_are_unchanged(view, blur_p):
    recipe = PirlRecipe(jigsaw_view=view, patch_rotation=view != "rotation", patch_flip_p=0.5, blur_p=blur_p)
    p = draw_params(recipe, 3, 2, torch.tensor([0, 7, 12345]))
    known = KNOWN[view]
    assert p.image.factor[0].tolist() == KNOWN_IMAGE_FACTOR_0 and p.image.order.tolist() == KNOWN_IMAGE_ORDER
    assert p.tiles.factor[1].tolist() == known["tile_factor_1"]
    assert p.tile_flip.int().tolist() == known["tile_flip"] and p.tile_rotation.tolist() == known["tile_rotation"]
    assert p.view_rotation.tolist() == known["view_rotation"]
    assert (p.image.factor.sum().item(), p.tiles.factor.sum().item()) == known["sums"]


@pytest.mark.fake_cuda
def test_stage_with_blur_runs_on_cuda_tensors_with_no_host_read():
    """The stage, blur included, on (fake) CUDA views: the output stays on the device, nothing is read back."""
    from torch._subclasses.fake_tensor import FakeTensor

    from tests.train.test_fake_cuda import CUDA, HostRealMode

    recipe = dataclasses.replace(BLURRED, jigsaw_view="image")
    batch = loader_batch(recipe, b=8)
    fake = HostRealMode()
    with fake:
        on_cuda = dict(batch)
        for key in (B.IMAGE, B.PATCHES):
            on_cuda[key] = fake.from_tensor(batch[key]).to(CUDA)
        out = BatchAugment(recipe, seed=0, kernels="tensor")(on_cuda, epoch=0)
        for key in (B.IMAGE, B.PATCHES):
            assert isinstance(out[key], FakeTensor) and out[key].device == CUDA and out[key].dtype == torch.float32
        assert out[B.PATCHES].shape == (8, 1, 3, 40, 40)


@pytest.mark.gpu
def test_stage_with_blur_on_cuda_matches_the_cpu():
    recipe = dataclasses.replace(BLURRED, jigsaw_view="image", image_size=224, blur_kernel_fraction=0.1)
    batch = loader_batch(recipe, b=32)
    cpu = BatchAugment(recipe, seed=1, kernels="tensor")(batch, epoch=0)
    on_gpu = {k: v.cuda() if k in (B.IMAGE, B.PATCHES) else v for k, v in batch.items()}
    gpu = BatchAugment(recipe, seed=1, kernels="tensor")(on_gpu, epoch=0)
    for key in (B.IMAGE, B.PATCHES):
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=ATOL, rtol=0)
