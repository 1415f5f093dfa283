"""Full-resolution (224 / 255 / 64) Batch contract on real photographs; skipped unless PIRL_REAL_DATA is set."""

import shutil

import pytest
import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.batch import check_batch, check_loader_batch
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.tools.make_shards import build_shards


NETTE_CLASSES = ["n01440764", "n02102040"]  # 2 of Imagenette's 10 classes: 200 test images, 224x224
# Normalised [0, 1] pixels with ImageNet mean/std lie in [-0.485/0.229, (1-0.406)/0.225] = [-2.12, 2.64].
NORMALISED_RANGE = (-2.2, 2.7)


@pytest.fixture(scope="module")
def nette_shards(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nette")
    for wnid in NETTE_CLASSES:
        shutil.copytree(real_data / "imagenette" / "test" / wnid, root / "images" / wnid)
    # ~1.3 MB per class: 600 KB shards give 6 shards of 13-40 samples.
    build_shards(root / "images", root / "shards", workers=0, shard_size=600_000)
    return root / "shards"


@pytest.fixture(scope="module")
def imagenet_sample_shards(real_data, tmp_path_factory):
    """48 heterogeneous ImageNet photos (sizes 68-2400 px, some greyscale) via a labelled list file."""
    folder = real_data / "imagenet-sample"
    lines = (folder / "labels.tsv").read_text().splitlines()[:48]
    listing = tmp_path_factory.mktemp("inet") / "list.txt"
    listing.write_text("".join(f"{folder / line.split(chr(9))[0]}\t{line.split(chr(9))[1]}\n" for line in lines))
    build_shards(listing, listing.parent / "shards", workers=0, shard_size=2_000_000)
    return listing.parent / "shards"


def _check_epoch(loader, recipe, num_classes):
    seen = []
    stage = BatchAugment(recipe)
    for batch in loader:
        check_loader_batch(batch, recipe, labelled=True)
        batch = stage(batch, epoch=0)
        check_batch(batch, recipe, labelled=True)
        for key in (B.IMAGE, B.PATCHES):
            assert NORMALISED_RANGE[0] <= batch[key].min() and batch[key].max() <= NORMALISED_RANGE[1]
        assert batch[B.LABEL].min() >= 0 and batch[B.LABEL].max() < num_classes
        seen += batch[B.INDEX].tolist()
    assert len(seen) == len(set(seen)) == loader.num_samples
    return seen


def test_full_resolution_contract_on_imagenette(nette_shards):
    recipe = PirlRecipe()
    loaders = [
        pipelines.make_loader("reference", str(nette_shards), recipe, batch_size=16, num_workers=1,
                              rank=r, world_size=2, seed=1, with_geometry=True)
        for r in range(2)
    ]
    assert loaders[0].classes == NETTE_CLASSES and len(loaders[0]) == len(loaders[1]) == 7
    seen = []
    stage = BatchAugment(recipe, seed=1)
    for loader in loaders:
        for batch in loader:
            check_loader_batch(batch, recipe, labelled=True)  # includes: every patch origin inside its 85-px cell
            batch = stage(batch, epoch=0)
            check_batch(batch, recipe, labelled=True)
            assert batch[B.IMAGE].shape[1:] == (3, 224, 224) and batch[B.PATCHES].shape[1:] == (9, 3, 64, 64)
            assert batch[B.IMAGE].dtype == batch[B.PATCHES].dtype == torch.float32
            assert batch[B.INDEX].dtype == batch[B.LABEL].dtype == torch.int64
            for key in (B.IMAGE, B.PATCHES):
                assert NORMALISED_RANGE[0] <= batch[key].min() and batch[key].max() <= NORMALISED_RANGE[1]
            assert set(batch[B.LABEL].tolist()) <= {0, 1}
            assert ((batch[B.PATCH_ORIGIN] % 85) <= 21).all()
            seen += batch[B.INDEX].tolist()
    assert sorted(seen) == list(range(200))


def test_heterogeneous_imagenet_photos(imagenet_sample_shards):
    recipe = PirlRecipe()
    loader = pipelines.make_loader("reference", str(imagenet_sample_shards), recipe, batch_size=12,
                                   num_workers=2)
    _check_epoch(loader, recipe, num_classes=len(loader.classes))
    stage = BatchAugment(recipe)
    evaluation = pipelines.make_loader("reference", str(imagenet_sample_shards), recipe, batch_size=12,
                                       num_workers=2, mode="eval")
    for batch in evaluation:
        check_loader_batch(batch, recipe, labelled=True, mode="eval")
        check_batch(stage.eval(batch), recipe, labelled=True, mode="eval")
