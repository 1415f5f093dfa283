"""The FFCV backend: contracts, the reference's crops and close pixels, epochs over ranks, resume, errors, training."""
import dataclasses
import importlib
import shutil
import sys

import numpy as np
import pytest
import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.batch import check_loader_batch

from .backend_checks import assert_same_crops_close_pixels, epoch, mad_per_view, make_loader as make
from .conftest import CLASS_SIZES

N = sum(CLASS_SIZES)
# Mean absolute difference per channel (uint8 levels) between the FFCV backend's and the reference's views of the
# same crop boxes. Two sources, both FFCV's own C code: its JPEG decoder uses libjpeg-turbo's fast integer IDCT
# (TJFLAG_FASTDCT; the reference decodes with the accurate one: ~1.2 levels alone on ImageNet photos), and its
# resize is OpenCV's INTER_AREA, not torch's antialiased bilinear (0.7-1.1 levels). Measured per view: mean 1.5-2.0
# per channel on the 400 imagenet-sample photos at 224 / 255 / 64 (worst view 8.6, reduced decoding on), at most
# 4.2 on the small noisy test JPEGs (4 epochs, every view kind). Raw-stored images skip the decoder.
MAD_BOUND_SYNTHETIC = 6.0
MAD_BOUND_PHOTOS_MEAN = 2.5  # mean over all views, per channel
MAD_BOUND_PHOTOS_VIEW = 12.0  # any single view


@pytest.fixture(scope="module")
def ffcv():
    return pytest.importorskip("ffcv")


@pytest.fixture(scope="module")
def small_beton(ffcv, small_shards, tmp_path_factory):
    """The 31 small JPEGs of conftest.small_shards, converted to a .beton (every idx kept)."""
    from pirl_trainer.tools.sharding.beton import build_beton

    out = tmp_path_factory.mktemp("ffcv") / "beton"
    build_beton(small_shards, out, workers=1)
    return out


@pytest.mark.parametrize("view", ["jigsaw", "rotation", "rotation_jigsaw", "image"])
def test_same_crops_as_the_reference_and_close_pixels(small_beton, small_shards, small_recipe, view):
    recipe = dataclasses.replace(small_recipe, jigsaw_view=view)
    ffcv = epoch(make("ffcv", small_beton, recipe, with_geometry=True, batch_size=5), 2)
    ref = epoch(make("reference", small_shards, recipe, with_geometry=True, batch_size=5), 2)
    assert_same_crops_close_pixels(ffcv, ref, recipe, MAD_BOUND_SYNTHETIC)


def test_eval_mode_matches_the_reference(small_beton, small_shards, small_recipe):
    ffcv = epoch(make("ffcv", small_beton, small_recipe, mode="eval", batch_size=8), 0)
    ref = epoch(make("reference", small_shards, small_recipe, mode="eval", batch_size=8), 0)
    assert torch.equal(torch.cat([b[B.INDEX] for b in ffcv]), torch.arange(N))  # identity order
    for a, b in zip(ffcv, ref, strict=True):
        check_loader_batch(a, small_recipe, labelled=True, mode="eval")
        assert set(a) == {B.IMAGE, B.INDEX, B.LABEL}
        assert torch.equal(a[B.LABEL], b[B.LABEL])
        assert (mad_per_view(a[B.IMAGE], b[B.IMAGE]) <= MAD_BOUND_SYNTHETIC).all()


def test_loader_describes_the_data_set_like_the_reference(small_beton, small_shards, small_recipe):
    ffcv = make("ffcv", small_beton, small_recipe, batch_size=4, world_size=2, rank=1)
    ref = make("reference", small_shards, small_recipe, batch_size=4, world_size=2, rank=1)
    for attr in ("num_samples", "classes", "labelled", "rank_samples", "batch_size"):
        assert getattr(ffcv, attr) == getattr(ref, attr), attr
    assert len(ffcv) == len(ref)
    # The .beton file itself works too; without its manifest the classes would be named "0".."max label".
    direct = make("ffcv", small_beton / "dataset.beton", small_recipe)
    assert direct.num_samples == N and direct.classes == ref.classes


@pytest.mark.parametrize("batch_size", [5, 4])  # 5: rank 0's last batch holds B + 1 = 6 samples
def test_exactly_once_over_two_ranks_with_equal_steps(small_beton, small_recipe, batch_size):
    loaders = [make("ffcv", small_beton, small_recipe, batch_size=batch_size, rank=r, world_size=2, num_workers=2)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    for e in (0, 1):
        seen, sizes = [], []
        for loader in loaders:
            batches = epoch(loader, e)
            assert len(batches) == len(loader)
            sizes += [len(b[B.INDEX]) for b in batches]
            seen += torch.cat([b[B.INDEX] for b in batches]).tolist()
        assert sorted(seen) == list(range(N)), e  # every sample exactly once over the ranks, none twice
        assert max(sizes) <= batch_size + 1 and min(sizes) >= 1
    if batch_size == 5:
        assert batch_size + 1 in sizes


def test_resume_from_a_step_gives_the_rest_of_the_epoch(small_beton, small_recipe):
    loader = make("ffcv", small_beton, small_recipe, batch_size=4)
    full = epoch(loader, 3)
    resumed = epoch(loader, 3, start_step=5)
    assert len(resumed) == len(full) - 5
    for a, b in zip(resumed, full[5:], strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(full[0][B.INDEX], epoch(loader, 4)[0][B.INDEX])  # another epoch, another order


def test_same_batches_whatever_the_threads_and_the_cache_and_batches_can_be_kept(small_beton, small_recipe):
    """Views are fresh tensors (not FFCV's reused buffers): batches kept over a whole epoch stay intact."""
    one = epoch(make("ffcv", small_beton, small_recipe, num_workers=0), 1)  # all batches held, then compared
    two = epoch(make("ffcv", small_beton, small_recipe, num_workers=2, os_cache=False), 1)
    for a, b in zip(one, two, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_an_abandoned_epoch_does_not_leak_into_the_next(small_beton, small_shards, small_recipe):
    loader = make("ffcv", small_beton, small_recipe, with_geometry=True)
    loader.set_epoch(0)
    first = iter(loader)
    next(first)  # FFCV's thread now runs ahead with epoch 0's draws
    second = epoch(loader, 1)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(first)
    ref = epoch(make("reference", small_shards, small_recipe, with_geometry=True), 1)
    for a, b in zip(second, ref, strict=True):
        for key in (B.INDEX, *B.GEOMETRY_KEYS):
            assert torch.equal(a[key], b[key]), key


def test_keeps_the_callers_thread_settings(small_beton, small_recipe):
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    epoch(make("ffcv", small_beton, small_recipe, num_workers=2), 0)  # FFCV sets both to num_workers
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_raw_stored_images_give_the_same_crops(ffcv, small_shards, small_recipe, tmp_path):
    from pirl_trainer.tools.sharding.beton import build_beton

    manifest = build_beton(small_shards, tmp_path / "raw", workers=1, compress_probability=0.5)
    assert manifest["beton"]["stored"]["raw"] > 0 and manifest["beton"]["stored"]["jpg"] > 0
    ffcv = epoch(make("ffcv", tmp_path / "raw", small_recipe, with_geometry=True), 0)
    ref = epoch(make("reference", small_shards, small_recipe, with_geometry=True), 0)
    for a, b in zip(ffcv, ref, strict=True):
        for key in (B.INDEX, *B.GEOMETRY_KEYS):
            assert torch.equal(a[key], b[key]), key
        for key in (B.IMAGE, B.PATCHES):
            assert (mad_per_view(a[key], b[key]) <= MAD_BOUND_SYNTHETIC).all(), key


def test_webdataset_shards_are_read_from_their_conversion_beside_them(ffcv, small_shards, small_recipe, tmp_path):
    from pirl_trainer.tools.sharding.beton import build_beton

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    with pytest.raises(pipelines.BackendUnavailable, match=f"--input {shards} --output {shards}-beton --format beton"):
        make("ffcv", shards, small_recipe)
    build_beton(shards, f"{shards}-beton", workers=1)
    ffcv = epoch(make("ffcv", shards, small_recipe), 0)  # the same data.shards as the other backends
    ref = epoch(make("reference", shards, small_recipe), 0)
    for a, b in zip(ffcv, ref, strict=True):
        assert torch.equal(a[B.INDEX], b[B.INDEX])
    manifest = shards / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # the shards changed since the conversion: refused again
    with pytest.raises(pipelines.BackendUnavailable, match="Convert them once"):
        make("ffcv", shards, small_recipe)


def test_missing_ffcv_says_how_to_install_it(small_shards, small_recipe, monkeypatch):
    # imported first, so that the module below is restored, not left broken
    importlib.import_module("pirl_trainer.pipelines.ffcv_loader")
    monkeypatch.delitem(sys.modules, "pirl_trainer.pipelines.ffcv_loader")  # re-imported without ffcv below
    monkeypatch.delattr(pipelines, "ffcv_loader")  # the re-import rebinds it
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # "import ffcv" now raises ImportError
    with pytest.raises(pipelines.BackendUnavailable, match=r"apt-get install .*libturbojpeg0-dev.*pip install"):
        make("ffcv", small_shards, small_recipe)


def test_real_photos_same_crops_and_close_pixels(ffcv, real_data, tmp_path_factory):
    """Full-resolution recipe on the 400 imagenet-sample photos, converted by make_shards --format beton."""
    from pirl_trainer.pipelines.recipe import PirlRecipe
    from pirl_trainer.tools.make_shards import build_shards
    from pirl_trainer.tools.sharding.beton import build_beton

    tmp = tmp_path_factory.mktemp("ffcv_real")
    build_shards(real_data / "imagenet-sample" / "labels.tsv", tmp / "shards", workers=2)
    build_beton(tmp / "shards", tmp / "beton", workers=2)
    recipe = PirlRecipe()
    ffcv = epoch(make("ffcv", tmp / "beton", recipe, batch_size=50, num_workers=2, with_geometry=True), 0)
    ref = epoch(make("reference", tmp / "shards", recipe, batch_size=50, num_workers=2, with_geometry=True), 0)
    views = {B.IMAGE: [], B.PATCHES: []}
    for a, b in zip(ffcv, ref, strict=True):
        check_loader_batch(a, recipe, labelled=True)
        for key in (B.INDEX, B.LABEL, *B.GEOMETRY_KEYS):
            assert torch.equal(a[key], b[key]), key
        for key in views:
            views[key].append(mad_per_view(a[key], b[key]).reshape(-1, 3))
    assert sorted(torch.cat([b[B.INDEX] for b in ffcv]).tolist()) == list(range(400))
    for key, mads in views.items():
        mads = torch.cat(mads)
        assert (mads.mean(dim=0) <= MAD_BOUND_PHOTOS_MEAN).all(), (key, mads.mean(dim=0))
        assert mads.max() <= MAD_BOUND_PHOTOS_VIEW, (key, mads.max())


def test_training_run_with_the_ffcv_backend_resumes_exactly(ffcv, tmp_path, capsys):
    """train/pirl.py with data.backend=ffcv (bank initialised from eval-mode features): a run stopped after step
    3 and resumed continues at step 4 (the log is appended to: a restart would log 1-4 after 1-3) and gives the
    uninterrupted run's step-4 loss."""
    from tests.train.conftest import tiny_overrides
    from pirl_trainer.tools.sharding.beton import build_beton
    from pirl_trainer.tools.synthetic_data import write_synthetic
    from pirl_trainer.train import checkpoint, pirl
    from pirl_trainer.train.run_log import read_jsonl

    write_synthetic(tmp_path / "images", per_class=3, size=64, seed=0)
    build_beton(tmp_path / "images", tmp_path / "beton", workers=1)
    extra = ["--data.backend=ffcv", "--optim.epochs=1", "--loss.bank_init=features"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    record = pirl.main([*tiny_overrides(tmp_path / "beton", full), *extra])  # 30 samples / batch 8: 4 steps
    assert record["step"] == 4 and np.isfinite(record["loss"])
    pirl.main([*tiny_overrides(tmp_path / "beton", broken), *extra, "--run.max_steps=3"])
    capsys.readouterr()
    pirl.main([*tiny_overrides(tmp_path / "beton", broken), *extra, "--resume"])
    assert f"resumed from {checkpoint.checkpoint_path(broken, 3)} at step 3" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(broken / "log.jsonl")] == [1, 2, 3, 4]
    losses = [{r["step"]: r["loss"] for r in read_jsonl(d / "log.jsonl")} for d in (full, broken)]
    for step in range(1, 5):
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-5, abs=1e-6), step


def test_a_beton_folder_given_to_the_reference_backend_says_what_it_is(small_beton, small_recipe):
    with pytest.raises(ValueError, match="holds an FFCV .beton.*data.backend=ffcv"):
        pipelines.make_loader("reference", str(small_beton), small_recipe, batch_size=4, num_workers=0)
