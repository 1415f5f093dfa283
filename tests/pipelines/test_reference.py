import dataclasses

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pirl_trainer import pipelines
from torchvision.io import ImageReadMode, decode_jpeg

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.batch import check_batch, check_loader_batch
from pirl_trainer.pipelines.shard_index import ShardReader

from .conftest import CLASS_SIZES

N = sum(CLASS_SIZES)


def decode(jpg) -> torch.Tensor:
    """torchvision's decoder: the reference pixels the loader's decoder must reproduce."""
    return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)


def make(shards, recipe, **kw):
    args = dict(batch_size=4, num_workers=0)
    args.update(kw)
    return pipelines.make_loader("reference", str(shards), recipe, **args)


def by_index(loader) -> dict[int, dict[str, torch.Tensor]]:
    """Every sample of one pass, keyed by global index."""
    out = {}
    for batch in loader:
        for row, i in enumerate(batch[B.INDEX].tolist()):
            assert i not in out, f"index {i} seen twice"
            out[i] = {k: v[row] for k, v in batch.items()}
    return out


def test_exactly_once_over_two_ranks_times_two_workers(small_shards, small_recipe):
    loaders = [make(small_shards, small_recipe, num_workers=2, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 4  # 16 and 15 samples in batches of 4
    seen = []
    for loader in loaders:
        loader.set_epoch(3)
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            check_loader_batch(batch, small_recipe, labelled=True)
            seen += batch[B.INDEX].tolist()
    assert sorted(seen) == list(range(N))


def test_batch_contract_with_geometry(small_shards, small_recipe):
    loader = make(small_shards, small_recipe, batch_size=5, with_geometry=True)
    assert (loader.num_samples, loader.labelled, loader.classes) == (N, True, ["class0", "class1", "class2"])
    labels_of = [k for k, n in enumerate(CLASS_SIZES) for _ in range(n)]  # folder order = idx order
    for batch in loader:
        check_loader_batch(batch, small_recipe, labelled=True)
        assert set(batch) == {B.IMAGE, B.PATCHES, B.INDEX, B.LABEL, *B.GEOMETRY_KEYS}
        assert batch[B.PATCHES].shape[1:] == (9, 3, 12, 12)
        assert batch[B.LABEL].tolist() == [labels_of[i] for i in batch[B.INDEX].tolist()]
        offsets = batch[B.PATCH_ORIGIN] - torch.tensor([[r * 16, c * 16] for r in range(3) for c in range(3)])
        assert offsets.min() >= 0 and offsets.max() <= small_recipe.max_patch_offset  # inside its cell
    assert B.PATCH_ORIGIN not in next(iter(make(small_shards, small_recipe)))


def test_views_do_not_depend_on_workers_batch_size_or_ranks(small_shards, small_recipe):
    """Loader and stage together: a sample's model-batch views are a function of (seed, epoch, index)."""
    stage = BatchAugment(small_recipe, seed=0)

    def painted(loader):
        return by_index([stage(batch, epoch=1) for batch in loader])

    reference = make(small_shards, small_recipe, num_workers=0)
    reference.set_epoch(1)
    ref_batches = list(reference)
    workers = make(small_shards, small_recipe, num_workers=2)
    workers.set_epoch(1)
    for a, b in zip(ref_batches, workers, strict=True):  # same batches, in sampler order
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ref = painted(ref_batches)
    for rank in range(2):
        split = make(small_shards, small_recipe, num_workers=1, rank=rank, world_size=2, batch_size=3)
        split.set_epoch(1)
        for i, sample in painted(split).items():
            for k in sample:
                torch.testing.assert_close(sample[k], ref[i][k], atol=1e-6, rtol=0)


def test_epochs_repeat_exactly_and_differ_from_each_other(small_shards, small_recipe):
    loader = make(small_shards, small_recipe)
    loader.set_epoch(2)
    first, again = list(loader), list(loader)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    loader.set_epoch(3)
    other = list(loader)
    assert first[0][B.INDEX].tolist() != other[0][B.INDEX].tolist()
    e2, e3 = by_index(first), by_index(other)
    assert not torch.equal(e2[0][B.IMAGE], e3[0][B.IMAGE])


def test_resume_yields_the_tail_of_the_epoch(small_shards, small_recipe):
    loader = make(small_shards, small_recipe)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_step=2)
    tail = list(loader)
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[2:], tail) for k in a)
    loader.set_epoch(4)
    loader.skip(len(full) - 1)
    (last,) = list(loader)
    assert torch.equal(last[B.INDEX], full[-1][B.INDEX])
    with pytest.raises(ValueError, match="start_step"):
        loader.skip(2)


def test_views_are_the_drawn_crops_of_the_decoded_image(small_shards, small_recipe):
    """uint8 views = torchvision's antialiased resized crops of torchvision's decode, at the drawn boxes, pixel for
    pixel, when decoding at full resolution (reduced decoding: tests/pipelines/test_views.py)."""
    small_recipe = dataclasses.replace(small_recipe, reduced_decoding=False)
    loader = make(small_shards, small_recipe, batch_size=8, with_geometry=True)
    reader = ShardReader(loader.table)
    flipped = 0
    for batch in loader:
        for row, i in enumerate(batch[B.INDEX].tolist()):
            decoded = decode(reader.read(i).jpg)
            top, left, h, w = batch[B.JIGSAW_BOX][row].tolist()
            crop = F.resized_crop(decoded, top, left, h, w, [48, 48], antialias=True)  # (3, 48, 48) uint8
            expected = torch.stack([crop[:, y:y + 12, x:x + 12] for y, x in batch[B.PATCH_ORIGIN][row].tolist()])
            assert torch.equal(batch[B.PATCHES][row], expected)
            top, left, h, w = batch[B.IMAGE_BOX][row].tolist()
            view = F.resized_crop(decoded, top, left, h, w, [32, 32], antialias=True)
            if batch[B.IMAGE_FLIPPED][row]:
                view, flipped = F.horizontal_flip(view), flipped + 1
            assert torch.equal(batch[B.IMAGE][row], view)
            assert not batch[B.JIGSAW_FLIPPED][row]
    assert 0 < flipped < N


@pytest.mark.parametrize("view", ["rotation", "image"])
def test_second_image_views_cut_their_own_box(small_shards, small_recipe, view):
    recipe = dataclasses.replace(small_recipe, jigsaw_view=view, reduced_decoding=False)
    loader = make(small_shards, recipe, batch_size=8, with_geometry=True)
    reader = ShardReader(loader.table)
    batch = next(iter(loader))
    check_loader_batch(batch, recipe, labelled=True)
    assert batch[B.PATCHES].shape[1:] == (1, 3, 32, 32)
    for row, i in enumerate(batch[B.INDEX].tolist()):
        top, left, h, w = batch[B.JIGSAW_BOX][row].tolist()
        view = F.resized_crop(decode(reader.read(i).jpg), top, left, h, w, [32, 32], antialias=True)
        if batch[B.JIGSAW_FLIPPED][row]:
            view = F.horizontal_flip(view)
        assert torch.equal(batch[B.PATCHES][row, 0], view)
    check_batch(BatchAugment(recipe)(batch, epoch=0), recipe, labelled=True)


def test_eval_mode_is_resize_centre_crop_in_order(small_shards, small_recipe):
    small_recipe = dataclasses.replace(small_recipe, reduced_decoding=False)
    loader = make(small_shards, small_recipe, mode="eval", batch_size=8, num_workers=2)
    batches = list(loader)
    assert torch.cat([b[B.INDEX] for b in batches]).tolist() == list(range(N))
    reader = ShardReader(loader.table)
    expected_view = v2.Compose([v2.Resize(round(32 * 256 / 224)), v2.CenterCrop(32)])
    for batch in batches:
        check_loader_batch(batch, small_recipe, labelled=True, mode="eval")
        assert set(batch) == {B.IMAGE, B.INDEX, B.LABEL}
        for row, i in enumerate(batch[B.INDEX].tolist()):
            assert torch.equal(batch[B.IMAGE][row], expected_view(decode(reader.read(i).jpg)))
        check_batch(BatchAugment(small_recipe).eval(batch), small_recipe, labelled=True, mode="eval")


def test_iteration_leaves_the_global_rng_alone(small_shards, small_recipe):
    state = torch.get_rng_state()
    list(make(small_shards, small_recipe, num_workers=1))
    assert torch.equal(state, torch.get_rng_state())


def test_bad_arguments_are_clear(small_shards, small_recipe):
    with pytest.raises(ValueError, match="unknown pipeline backend 'tfrecord'.*'reference'"):
        pipelines.make_loader("tfrecord", str(small_shards), small_recipe, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="with_geometry"):
        make(small_shards, small_recipe, mode="eval", with_geometry=True)
    with pytest.raises(ValueError, match="mode"):
        make(small_shards, small_recipe, mode="train")
    with pytest.raises(ValueError, match="fewer than world_size"):
        make(small_shards, small_recipe, world_size=64)
    with pytest.raises(ValueError, match="patch_size"):
        make(small_shards, dataclasses.replace(small_recipe, patch_size=17))
    with pytest.raises(TypeError, match="PirlRecipe"):
        make(small_shards, {"image_size": 32})


def test_select_reads_only_the_chosen_samples_in_order_every_epoch(small_shards, small_recipe):
    loader = make(small_shards, small_recipe, mode="eval", batch_size=3)
    full = by_index(loader)
    chosen = [29, 3, 17, 0, 8]
    loader.select(chosen)
    assert len(loader) == 2
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [batch for batch in loader]
        assert [b[B.INDEX].tolist() for b in batches] == [[29, 3, 17], [0, 8]]
        for b in batches:
            for row, i in enumerate(b[B.INDEX].tolist()):
                assert torch.equal(b[B.IMAGE][row], full[i][B.IMAGE])  # the same eval view as in a full pass
    loader.set_epoch(0, start_step=1)
    assert [b[B.INDEX].tolist() for b in loader] == [[0, 8]]
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 2\]"):
        loader.set_epoch(0, start_step=3)


def test_select_refuses_what_it_cannot_do(small_shards, small_recipe):
    with pytest.raises(ValueError, match="eval loaders"):
        make(small_shards, small_recipe).select([0, 1])
    with pytest.raises(ValueError, match="rank 1 of 2"):
        make(small_shards, small_recipe, mode="eval", rank=1, world_size=2).select([0, 1])
    loader = make(small_shards, small_recipe, mode="eval")
    with pytest.raises(IndexError, match=rf"\[0, {N}\), got 2 in \[0, {N}\]"):
        loader.select([0, N])
    with pytest.raises(IndexError, match="got 0 in"):
        loader.select([])
    assert len(loader) == -(-N // 4)  # a refused selection leaves the full plan
