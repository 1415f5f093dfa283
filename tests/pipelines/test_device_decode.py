"""Decoding in the main process (data.decode_device: cpu / cuda): the batched resize against torch's, the views
against the reference's, epochs, corrupt samples, errors, the CUDA path (fake tensors here, a real GPU under `gpu`)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as NF
from torch._subclasses.fake_tensor import FakeTensor

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batch import check_loader_batch
from pirl_trainer.pipelines.batched_resize import Crop, plan_chunks, resize_weights, resized_crops
from pirl_trainer.pipelines.device_decode import (EncodedDataset, collate_encoded, cut_patch_batch, cut_views,
                                                  decode_batch)
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.reference import MainProcessDecodeLoader

from tests.train.conftest import synthetic_shards, tiny_overrides  # noqa: F401  (a fixture)
from .backend_checks import assert_same_crops_close_pixels, epoch, mad_per_view, make_loader
from .conftest import CLASS_SIZES
from .test_corrupt_samples import (DAMAGE, UNDECODABLE, assert_each_damage_is_named, assert_left_out_and_named,
                                   damage_shards)
from .test_real_data import imagenet_sample_shards  # noqa: F401  (a fixture)

N = sum(CLASS_SIZES)
FULL = PirlRecipe(reduced_decoding=False)  # 224 / 255 / 64, both sides decoding at full resolution
# Mean absolute difference of each view (the image or one tile), per channel, in grey levels, against the reference
# decoding at full resolution: the same weights, float32 here and torch's fixed-point uint8 kernel there, so the
# views differ by rounding. Measured, the worst view: 0.23 on the 400 ImageNet sample photos (0.26 in eval mode),
# 0.21 on the small test JPEGs; a box one pixel off gives several levels.
MAD_BOUND = 0.5
# nvJPEG and libjpeg-turbo differ slightly in their IDCT and chroma upsampling: the bound the views must keep
# between decode_device=cuda and cpu.
MAD_BOUND_GPU = 2.0
# Against the reference's default reduced-scale decoding (recipe.reduced_decoding, which the main-process decode
# does not do): tests/pipelines/test_views.py's bounds for reduced against full decoding. Measured: mean 0.18,
# worst view 4.1 on the 400 photos.
MEAN_BOUND_REDUCED, WORST_BOUND_REDUCED = 2.0, 8.0


def make(shards, recipe, **kw):
    """The reference backend decoding in the main process on the CPU, unless `kw` says otherwise."""
    return make_loader("reference", shards, recipe, **{"decode_device": "cpu", **kw})


def torch_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in): torch's own antialiased bilinear float32 weights, read off by resizing the identity (one impulse
    per column) along one axis; the other axis keeps its size, which is the identity too."""
    eye = torch.eye(in_size)[None, None]
    return NF.interpolate(eye, size=(out_size, in_size), mode="bilinear", antialias=True, align_corners=False)[0, 0]


SIZES = [(100, 224), (224, 100), (375, 224), (2400, 224), (7, 13), (13, 7), (255, 255), (500, 255), (68, 255)]


@pytest.mark.parametrize("in_size, out_size", SIZES)
def test_weights_are_torchs(in_size, out_size):
    ours = resize_weights(torch.tensor([in_size]), torch.tensor([out_size]), torch.tensor([0]), out_size,
                          in_size + 5)[0]  # 5 padded columns: zero weights
    # float32 rounding apart (torch's own float32 weights differ from float64 ones by ~1e-5)
    torch.testing.assert_close(ours[:, :in_size], torch_weights(in_size, out_size), atol=1e-6, rtol=0)
    assert (ours[:, in_size:] == 0).all()
    flipped = resize_weights(torch.tensor([in_size]), torch.tensor([out_size]), torch.tensor([0]), out_size,
                             in_size, torch.tensor([True]))[0]
    assert torch.equal(flipped, ours[:, :in_size].flip(0))


# (image size, box (top, left, h, w), resized to, kept window (y, x, h, w), flipped): down and up, non-square,
# flips, a centre window (the eval view) and boxes at the image's edges.
CASES = [
    ((300, 400), (10, 20, 250, 310), (224, 224), (0, 0, 224, 224), False),
    ((300, 400), (0, 0, 300, 400), (224, 224), (0, 0, 224, 224), True),
    ((60, 90), (5, 3, 50, 70), (224, 224), (0, 0, 224, 224), True),
    ((1200, 900), (100, 0, 1100, 900), (255, 255), (0, 0, 255, 255), False),
    ((375, 500), (0, 0, 375, 500), (256, 341), (16, 58, 224, 224), False),
    ((90, 40), (0, 0, 90, 40), (80, 37), (0, 0, 80, 37), True),
]


def test_resize_equals_torchs_float_interpolate():
    """resized_crops, chunked, banded and padded, equals F.interpolate on each crop alone (float), then its window
    and flip; uint8 output = that rounded."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8) for size, *_ in CASES]
    for size in {(224, 224), (80, 37), (255, 255)}:
        picked = [(k, c) for k, c in enumerate(CASES) if c[3][2:] == size]
        crops = [Crop(k, box, resize, window[:2], flipped) for k, (_, box, resize, window, flipped) in picked]
        ours = resized_crops(images, crops, size, dtype=torch.float32)
        rounded = resized_crops(images, crops, size)
        # a budget of one crop per chunk gives the same pixels
        assert torch.equal(resized_crops(images, crops, size, budget=1), rounded)
        for row, (k, (_, (top, left, h, w), resize, (y, x, wh, ww), flipped)) in enumerate(picked):
            crop = images[k][None, :, top:top + h, left:left + w].float()
            ref = NF.interpolate(crop, size=resize, mode="bilinear", antialias=True, align_corners=False)[0]
            ref = ref[:, y:y + wh, x:x + ww]
            ref = ref.flip(-1) if flipped else ref
            torch.testing.assert_close(ours[row], ref, atol=1e-3, rtol=0)  # ~1e-5 relative to 255
            assert torch.equal(rounded[row], ours[row].round().to(torch.uint8))


def test_chunks_bound_padding_and_memory():
    crops = [Crop(0, (0, 0, h, w), (224, 224)) for h, w in [(2000, 1500), (300, 400), (400, 300), (60, 60), (290, 390)]]
    chunks = plan_chunks(crops, 3, (224, 224))
    assert sorted(k for c in chunks for k in c) == list(range(5))
    for chunk in chunks:  # no crop padded beyond twice its area: the large and the tiny crop go alone
        height, width = max(crops[k].box[2] for k in chunk), max(crops[k].box[3] for k in chunk)
        assert all(height * width <= 2 * crops[k].box[2] * crops[k].box[3] for k in chunk)
    assert [0] in chunks and [3] in chunks
    assert all(len(c) == 1 for c in plan_chunks(crops, 3, (224, 224), budget=1))


def test_patches_are_cut_at_their_origins():
    crops = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    origins = torch.tensor([[[0, 0], [20, 36]], [[36, 1], [5, 7]]])
    patches = cut_patch_batch(crops, origins, 12)
    assert patches.shape == (2, 2, 3, 12, 12)
    for b in range(2):
        for k, (y, x) in enumerate(origins[b].tolist()):
            assert torch.equal(patches[b, k], crops[b, :, y:y + 12, x:x + 12])


def check_against_reference(shards, recipe, bound, **kw):
    """Both loaders over one epoch: the same samples and geometry exactly, each view within `bound`; returns every
    view's per-channel differences (image, patches)."""
    ours = epoch(make(shards, recipe, with_geometry=True, **kw), 2)
    ref = epoch(make(shards, recipe, with_geometry=True, decode_device="workers", **kw), 2)
    return assert_same_crops_close_pixels(ours, ref, recipe, bound)


def test_full_recipe_matches_the_reference_on_small_jpegs(small_shards):
    check_against_reference(small_shards, FULL, MAD_BOUND, batch_size=8)


def test_full_recipe_matches_the_reference_on_photos(imagenet_sample_shards):  # noqa: F811
    check_against_reference(imagenet_sample_shards, FULL, MAD_BOUND, batch_size=16)
    # Against the reference's default (reduced-scale decoding of large photos): the same geometry, close views.
    diffs = check_against_reference(imagenet_sample_shards, PirlRecipe(), WORST_BOUND_REDUCED, batch_size=16)
    assert all(d.mean() <= MEAN_BOUND_REDUCED for d in diffs.values())


@pytest.mark.parametrize("view", ["rotation", "rotation_jigsaw", "image"])
def test_other_views_match_the_reference(small_shards, small_recipe, view):
    recipe = dataclasses.replace(small_recipe, jigsaw_view=view, reduced_decoding=False)
    check_against_reference(small_shards, recipe, MAD_BOUND, batch_size=5)


def test_eval_mode_matches_the_reference(small_shards, imagenet_sample_shards):  # noqa: F811
    for shards in (small_shards, imagenet_sample_shards):
        ours = epoch(make(shards, FULL, mode="eval", batch_size=16))
        ref = epoch(make(shards, FULL, mode="eval", batch_size=16, decode_device="workers"))
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            check_loader_batch(a, FULL, labelled=True, mode="eval")
            assert set(a) == {B.IMAGE, B.INDEX, B.LABEL}
            assert a[B.INDEX].tolist() == b[B.INDEX].tolist()  # identity order
            assert (mad_per_view(a[B.IMAGE], b[B.IMAGE]) <= MAD_BOUND).all()


def test_batch_keys_and_devices(small_shards, small_recipe):
    batch = next(iter(make(small_shards, small_recipe, batch_size=5)))
    assert set(batch) == {B.IMAGE, B.PATCHES, B.INDEX, B.LABEL}  # geometry only when asked for
    check_loader_batch(batch, small_recipe, labelled=True)
    assert all(v.device.type == "cpu" for v in batch.values())


def test_exactly_once_over_two_ranks_and_the_same_batches_whatever_the_workers(small_shards, small_recipe):
    loaders = [make(small_shards, small_recipe, num_workers=2, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 4  # 16 and 15 samples in batches of 4
    seen = []
    for rank, loader in enumerate(loaders):
        batches = epoch(loader, 3)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b[B.INDEX].tolist()]
        alone = epoch(make(small_shards, small_recipe, num_workers=0, rank=rank, world_size=2), 3)
        for a, b in zip(batches, alone, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(seen) == list(range(N))
    ref = [make(small_shards, small_recipe, rank=r, world_size=2, decode_device="workers") for r in range(2)]
    assert seen == [i for loader in ref for b in epoch(loader, 3) for i in b[B.INDEX].tolist()]


def test_resume_yields_the_tail_of_the_epoch(small_shards, small_recipe):
    loader = make(small_shards, small_recipe, num_workers=1)
    full = epoch(loader, 4)
    for start in (1, len(full) - 1):
        tail = epoch(loader, 4, start_step=start)
        assert len(tail) == len(full) - start
        assert all(torch.equal(a[k], b[k]) for a, b in zip(full[start:], tail, strict=True) for k in a)
    assert epoch(loader, 5)[0][B.INDEX].tolist() != full[0][B.INDEX].tolist()


def test_decoding_runs_under_its_profiler_label(small_shards, small_recipe):
    loader = make(small_shards, small_recipe)
    loader.set_epoch(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        next(iter(loader))
    assert "decode" in {e.name for e in prof.events()}


@pytest.fixture(scope="module")
def damaged_shards(small_shards, tmp_path_factory):
    """The small shards with test_corrupt_samples' damages, the undecodable one included."""
    root = tmp_path_factory.mktemp("damaged_device_decode")
    return root / "data", damage_shards(small_shards, root / "data", {**DAMAGE, **UNDECODABLE})


@pytest.mark.parametrize("mode", ["pretrain", "eval"])
def test_corrupt_samples_are_left_out_counted_and_named(damaged_shards, small_shards, small_recipe, mode, capsys):
    data, where = damaged_shards
    loader = make(data, small_recipe, mode=mode, with_geometry=mode == "pretrain", num_workers=2)
    batches = epoch(loader, 1)
    intact = epoch(make(small_shards, small_recipe, mode=mode, with_geometry=mode == "pretrain"), 1)
    assert_left_out_and_named(loader, batches, intact, where, capsys.readouterr().err)


def test_each_damage_is_named_past_the_limit(damaged_shards, small_recipe):
    data, where = damaged_shards
    assert_each_damage_is_named(make(data, small_recipe, mode="eval", batch_size=8), where)


def test_a_failed_batched_decode_falls_back_to_one_image_at_a_time(damaged_shards, small_recipe):
    """The undecodable JPEG makes the batched decode raise; the others of its batch are decoded alone."""
    data, where = damaged_shards
    (bad,) = UNDECODABLE
    loader = make(data, small_recipe, mode="eval", batch_size=8)
    encoded = collate_encoded([loader.dataset[(0, i)] for i in range(24, 32) if i < N])
    images, rows = decode_batch(encoded, torch.device("cpu"))
    assert encoded[B.INDEX][rows].tolist() == [i for i in range(24, N) if i != bad]
    assert [tuple(im.shape[1:]) for im in images] == [tuple(s) for s in encoded["size"][rows].tolist()]


def test_bad_decode_devices_are_clear(small_shards, small_recipe, monkeypatch):
    for bad in ("gpu", "CPU", torch.device("meta"), 0):
        with pytest.raises(ValueError, match=r"decode_device \(data.decode_device\) must be one of"):
            make(small_shards, small_recipe, decode_device=bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pipelines.BackendUnavailable, match=r"decode_device='cuda' \(data.decode_device\).*none is "
                                                           "available"):
        make(small_shards, small_recipe, decode_device="cuda")
    assert isinstance(make(small_shards, small_recipe, decode_device=torch.device("cpu")), MainProcessDecodeLoader)
    assert not isinstance(make(small_shards, small_recipe, decode_device="workers"), MainProcessDecodeLoader)


@pytest.mark.parametrize("overrides, message", [
    (["--data.decode_device=gpu"], r"data.decode_device must be one of \('workers', 'cpu', 'cuda'\), got 'gpu'"),
    (["--data.backend=ffcv", "--data.decode_device=cpu"], "data.decode_device=cpu applies to data.backend=reference"),
    (["--data.backend=dali", "--data.decode_device=cuda"], "data.decode_device=cuda applies to data.backend=reference"),
    (["--data.decode_device=cuda"], "data.decode_device=cuda decodes on the training GPU, but this run trains on cpu"),
])
def test_training_config_errors(synthetic_shards, tmp_path, overrides, message):  # noqa: F811
    from pirl_trainer.train import pirl
    from pirl_trainer.train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path / "run"), *overrides])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_short_training_run_decodes_in_the_main_process(synthetic_shards, tmp_path, monkeypatch):  # noqa: F811
    from pirl_trainer.train import pirl

    built = []
    real = pirl.build_loader

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(pirl, "build_loader", recording)
    record = pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--data.decode_device=cpu", "--run.max_steps=2"])
    assert record["step"] == 2 and torch.isfinite(torch.tensor(record["loss"]))
    assert built and all(isinstance(loader, MainProcessDecodeLoader) for loader in built)


@pytest.mark.fake_cuda
def test_the_cut_runs_on_cuda_tensors_with_no_host_read(small_shards, small_recipe):
    """cut_views on decoded images moved to (fake) CUDA: every view on the device, nothing read back from it, no CPU
    tensor meeting a CUDA one (nvJPEG itself cannot run here: the images come from the CPU decode)."""
    from tests.train.test_fake_cuda import CUDA, HostRealMode

    table = make(small_shards, small_recipe).table
    for recipe in (small_recipe, dataclasses.replace(small_recipe, jigsaw_view="rotation")):
        for mode in ("pretrain", "eval"):
            dataset = EncodedDataset(table, recipe, mode=mode, seed=0)
            encoded = collate_encoded([dataset[(0, i)] for i in range(6)])
            images, _ = decode_batch(encoded, torch.device("cpu"))
            fake = HostRealMode()
            with fake:
                on_cuda = [fake.from_tensor(im).to(CUDA) for im in images]
                batch = cut_views(on_cuda, encoded, recipe, mode, with_geometry=mode == "pretrain")
                for key in (B.IMAGE, B.PATCHES) if mode == "pretrain" else (B.IMAGE,):
                    assert isinstance(batch[key], FakeTensor) and batch[key].device == CUDA, key
                    assert batch[key].dtype == torch.uint8
                assert not isinstance(batch[B.INDEX], FakeTensor)  # the host copy, for the stage's draws
                if mode == "pretrain":
                    assert not isinstance(batch[B.IMAGE_BOX], FakeTensor)
                    with pytest.raises(Exception, match="cpu"):  # the dry run does catch a CPU tensor on CUDA
                        cut_patch_batch(batch[B.IMAGE], encoded[B.PATCH_ORIGIN], 4)


@pytest.mark.gpu
@pytest.mark.parametrize("data", ["small_shards", "imagenet_sample_shards"])
def test_cuda_decoding_matches_cpu_decoding(request, data):
    """nvJPEG on the GPU against libjpeg-turbo on the CPU, the same cut: same samples and geometry, close views."""
    shards = request.getfixturevalue(data)
    for mode in ("pretrain", "eval"):
        geometry = mode == "pretrain"
        gpu = epoch(make(shards, FULL, mode=mode, with_geometry=geometry, batch_size=16, decode_device="cuda"))
        cpu = epoch(make(shards, FULL, mode=mode, with_geometry=geometry, batch_size=16))
        assert len(gpu) == len(cpu)
        for a, b in zip(gpu, cpu):
            check_loader_batch(a, FULL, labelled=True, mode=mode)
            assert a[B.IMAGE].device.type == "cuda" and a[B.INDEX].device.type == "cpu"
            for key in (B.INDEX, B.LABEL, *(B.GEOMETRY_KEYS if geometry else ())):
                assert torch.equal(a[key], b[key]), key
            for key in (B.IMAGE, B.PATCHES) if geometry else (B.IMAGE,):
                assert (mad_per_view(a[key].cpu(), b[key]) <= MAD_BOUND_GPU).all(), key
