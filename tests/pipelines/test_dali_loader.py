"""The DALI backend in CPU mode (device_id=None): contracts, the reference's crops, epochs, resume, errors."""
import builtins
import dataclasses

import pytest
import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batch import check_loader_batch
from pirl_trainer.pipelines.dali_options import DaliOptions

from .backend_checks import assert_same_crops_close_pixels, epoch, mad_per_view, make_loader
from .conftest import CLASS_SIZES

N = sum(CLASS_SIZES)
CPU = DaliOptions(decode_device="cpu")
# Mean absolute difference of each view (the image or one tile), per channel (uint8 levels), between DALI's and
# the reference's views of the same crop boxes. Both filters are antialiased bilinear; they differ in fixed-point
# rounding and at the crop's border (DALI's ROI resize reads the pixels just outside the box, torch's
# crop-then-resize clamps at it). Measured, the worst view: 0.34 on 48 ImageNet photos at 224 / 255 / 64, 0.46 on
# the small noisy test JPEGs (0.20 in eval mode). A box one pixel off gives up to 14 on those JPEGs.
MAD_BOUND_SYNTHETIC = 0.75
MAD_BOUND_PHOTOS = 0.6



@pytest.fixture(scope="module")
def dali():
    """DALI is an optional install (the `dali` extra): its tests skip without it, except those of its absence."""
    return pytest.importorskip("nvidia.dali")


def make(backend, shards, recipe, **kw):
    """backend_checks.make_loader, DALI decoding on the CPU unless `kw` gives other options."""
    if backend == "dali":
        kw.setdefault("options", CPU)
    return make_loader(backend, shards, recipe, **kw)


@pytest.mark.parametrize("view", ["jigsaw", "rotation", "rotation_jigsaw", "image"])
def test_same_crops_as_the_reference_and_close_pixels(dali, small_shards, small_recipe, view):
    recipe = dataclasses.replace(small_recipe, jigsaw_view=view, reduced_decoding=False)
    dali = epoch(make("dali", small_shards, recipe, with_geometry=True, batch_size=5), 2)
    ref = epoch(make("reference", small_shards, recipe, with_geometry=True, batch_size=5), 2)
    assert_same_crops_close_pixels(dali, ref, recipe, MAD_BOUND_SYNTHETIC)


def test_eval_mode_matches_the_reference(dali, small_shards, small_recipe):
    recipe = dataclasses.replace(small_recipe, reduced_decoding=False)
    dali = epoch(make("dali", small_shards, recipe, mode="eval", batch_size=8), 0)
    ref = epoch(make("reference", small_shards, recipe, mode="eval", batch_size=8), 0)
    for a, b in zip(dali, ref, strict=True):
        check_loader_batch(a, recipe, labelled=True, mode="eval")
        assert a[B.INDEX].tolist() == b[B.INDEX].tolist()  # identity order
        assert (mad_per_view(a[B.IMAGE], b[B.IMAGE]) <= MAD_BOUND_SYNTHETIC).all()
    with pytest.raises(NotImplementedError, match="DaliLoader plans its epochs itself"):
        make("dali", small_shards, recipe, mode="eval", batch_size=8).select([0, 1])  # the kNN monitor drops rows


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_over_two_ranks_with_equal_steps(dali, small_shards, small_recipe, workers):
    loaders = [make("dali", small_shards, small_recipe, num_workers=workers, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 4  # 31 samples: 16 and 15, in batches of 4 (the last up to 5)
    seen = []
    for loader in loaders:
        batches = epoch(loader, 3)
        assert len(batches) == len(loader)
        seen += [i for batch in batches for i in batch[B.INDEX].tolist()]
    assert sorted(seen) == list(range(N))
    ref = [make("reference", small_shards, small_recipe, rank=r, world_size=2) for r in range(2)]
    assert seen == [i for loader in ref for batch in epoch(loader, 3) for i in batch[B.INDEX].tolist()]


def test_next_epochs_reuse_the_pipeline_and_resume_rebuilds_it(dali, small_shards, small_recipe):
    loader = make("dali", small_shards, small_recipe, num_workers=1)
    first = epoch(loader, 0)
    pipe = loader._pipe
    second = epoch(loader, 1)  # the epoch after a finished one: same pipeline, DALI's epoch counter moves on
    assert loader._pipe is pipe
    assert first[0][B.INDEX].tolist() != second[0][B.INDEX].tolist()
    tail = epoch(loader, 1, start_step=2)  # a resume: a fresh pipeline starting at that step
    assert loader._pipe is not pipe
    assert len(tail) == len(second) - 2
    for a, b in zip(second[2:], tail, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = epoch(loader, 0)  # an epoch abandoned or repeated out of order is rebuilt, with the same batches
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_abandoned_epoch_is_rebuilt_not_continued(dali, small_shards, small_recipe):
    loader = make("dali", small_shards, small_recipe)
    full = epoch(loader, 5)
    loader.set_epoch(5)
    next(iter(loader))  # the training loop stops mid-epoch (max_steps)
    loader.set_epoch(6)
    after = list(loader)
    assert [b[B.INDEX].tolist() for b in after] == [b[B.INDEX].tolist() for b in
                                                    epoch(make("reference", small_shards, small_recipe), 6)]
    assert len(full) == len(after)


def test_mixed_decoding_without_a_gpu_says_what_to_do(dali, small_shards, small_recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pipelines.BackendUnavailable, match="decode_device=cpu"):
        make("dali", small_shards, small_recipe, options=DaliOptions(decode_device="mixed"))
    loader = make("dali", small_shards, small_recipe, options=DaliOptions(decode_device="auto"))
    assert loader.device == "cpu"
    with pytest.raises(ValueError, match="dali.decode_device"):
        make("dali", small_shards, small_recipe, options=DaliOptions(decode_device="gpu"))


def test_missing_dali_says_how_to_install_it(small_shards, small_recipe, monkeypatch):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(pipelines.BackendUnavailable, match="pip install nvidia-dali"):
        make("dali", small_shards, small_recipe)


def test_real_photos_close_to_the_reference(dali, real_data, tmp_path_factory):
    """Full-resolution recipe on ImageNet JPEGs: same crops, pixels within MAD_BOUND_PHOTOS per channel."""
    from pirl_trainer.pipelines.recipe import PirlRecipe
    from pirl_trainer.tools.make_shards import build_shards

    shards = tmp_path_factory.mktemp("dali_real") / "shards"
    files = sorted((real_data / "imagenet-sample").rglob("*.JPEG"))[:48]
    assert files, "no JPEGs under imagenet-sample"
    listing = shards.parent / "list.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    build_shards(listing, shards, workers=0)
    recipe = PirlRecipe(reduced_decoding=False)
    dali = epoch(make("dali", shards, recipe, batch_size=16, num_workers=2, with_geometry=True), 0)
    ref = epoch(make("reference", shards, recipe, batch_size=16, with_geometry=True), 0)
    for a, b in zip(dali, ref, strict=True):
        check_loader_batch(a, recipe, labelled=False)
        for key in B.GEOMETRY_KEYS:
            assert torch.equal(a[key], b[key]), key
        for key in (B.IMAGE, B.PATCHES):
            assert (mad_per_view(a[key], b[key]) <= MAD_BOUND_PHOTOS).all(), key


def test_spawned_workers_give_the_same_batches(dali, small_shards, small_recipe, monkeypatch):
    """Once CUDA is initialised (training on a GPU) the source's workers are spawned, not forked: the
    source must pickle and give the same batches."""
    from nvidia.dali._multiproc.pool import ProcPool

    started = []  # the start method of each pool's worker processes, as they are started
    real_start = ProcPool._start_processes

    def start(self, mp, start_method, write_sockets):
        started.append({process._start_method for process in self._processes})
        return real_start(self, mp, start_method, write_sockets)

    monkeypatch.setattr(ProcPool, "_start_processes", start)
    forked = epoch(make("dali", small_shards, small_recipe, num_workers=2), 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    spawned = epoch(make("dali", small_shards, small_recipe, num_workers=2), 1)
    assert started == [{"fork"}, {"spawn"}]
    for a, b in zip(forked, spawned, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_separate_cpu_queue_gives_the_same_batches(dali, small_shards, small_recipe):
    one_queue = epoch(make("dali", small_shards, small_recipe), 0)
    options = DaliOptions(decode_device="cpu", cpu_queue_depth=3, prefetch_queue_depth=2)
    assert options.queue_depths() == {"cpu_size": 3, "gpu_size": 2}
    separated = epoch(make("dali", small_shards, small_recipe, options=options), 0)
    for a, b in zip(one_queue, separated, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
