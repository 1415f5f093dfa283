import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.tools.make_shards import build_shards

# The backend tests' shared checks: their asserts rewritten like the tests' own, so that a failure shows the values.
pytest.register_assert_rewrite("tests.pipelines.backend_checks")

# 31 images over 3 classes: N is odd (uneven over 2 ranks) and the shards below hold unequal counts.
CLASS_SIZES = (11, 10, 10)
# Bytes per shard: with the 2-6 KB test JPEGs (plus tar headers) this gives 5 shards of 6-7 samples.
SMALL_SHARD_BYTES = 60_000


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """num_workers=0 runs the augmentation in this process: on tiny tensors intra-op threads only add
    overhead, and on the shared 2-core test machine spinning OpenMP threads made it ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_recipe() -> PirlRecipe:
    # 48 = 3 cells of 16 px, 12 px patches -> offsets 0..4; small enough for fast tests.
    return PirlRecipe(image_size=32, jigsaw_size=48, patch_size=12).validate()


def write_image_tree(root: Path, class_sizes=CLASS_SIZES, seed: int = 0) -> Path:
    """root/class<k>/img<j>.jpg of random sizes 40-119 px; the first image of each class is greyscale."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(class_sizes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for j in range(n):
            h, w = rng.integers(40, 120, size=2)
            # Smooth gradients plus noise: compressible like photographs, not like pure noise.
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if j == 0:
                image = image.convert("L")
            image.save(folder / f"img{j}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Shards of 31 small labelled JPEGs, several unequal shards (made by tools/make_shards.py)."""
    root = tmp_path_factory.mktemp("pipelines_data")
    src = write_image_tree(root / "images")
    out = root / "shards"
    manifest = build_shards(src, out, workers=0, shard_size=SMALL_SHARD_BYTES)
    counts = [s["samples"] for s in manifest["shards"]]
    assert manifest["num_samples"] == sum(CLASS_SIZES)
    assert len(counts) >= 3 and len(set(counts)) > 1, f"want several unequal shards, got {counts}"
    return out


@pytest.fixture(scope="session")
def real_data() -> Path:
    root = os.environ.get("PIRL_REAL_DATA")
    if not root:
        pytest.skip("PIRL_REAL_DATA not set")
    return Path(root)
