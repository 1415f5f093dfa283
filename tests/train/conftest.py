import pytest

from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.tools.synthetic_data import write_synthetic


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Labelled shards of 30 synthetic 64 px images (3 per class), in several shards."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "images", per_class=3, size=64, seed=0)
    build_shards(root / "images", root / "shards", workers=1, shard_size=40_000)
    return root / "shards"


@pytest.fixture(scope="session")
def unlabelled_shards(tmp_path_factory):
    """Shards of 10 synthetic 32 px images made from a plain file list: no labels."""
    root = tmp_path_factory.mktemp("unlabelled")
    write_synthetic(root / "images", per_class=1, size=32, seed=0)
    images = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    (root / "list.txt").write_text("".join(f"{p}\n" for p in images))
    build_shards(root / "list.txt", root / "shards", workers=1, shard_size=40_000)
    return root / "shards"


def tiny_overrides(shards, out_dir):
    """A run small enough for a unit test: 32 px views, 16 px patches, 8 negatives, ResNet-18."""
    return [
        f"--data.shards={shards}", f"--run.out_dir={out_dir}",
        "--data.batch_size=8", "--data.num_workers=0",
        "--data.recipe.image_size=32", "--data.recipe.jigsaw_size=48", "--data.recipe.patch_size=16",
        "--model.arch=resnet18", "--loss.num_negatives=8", "--optim.epochs=2",
        "--run.log_every=1", "--run.ckpt_every=3", "--run.tensorboard=false", "--run.cpu=true",
    ]
