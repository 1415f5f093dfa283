"""make_shards on real ImageNet photos, read back by webdataset and by DALI (needs PIRL_REAL_DATA)."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pirl_trainer.tools.make_shards import build_shards, verify_shards
from pirl_trainer.pipelines.shard_format import shard_files

NUM_IMAGES = 400  # ../shared/data/README.md: imagenet-sample holds 400 photos, one per class
SHARD_SIZE = 16 * 2**20  # ~46 MB of photos: 3 shards, so that reading crosses shard boundaries


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    root = os.environ.get("PIRL_REAL_DATA")
    if not root:
        pytest.skip("PIRL_REAL_DATA is not set")
    return Path(root) / "imagenet-sample"


@pytest.fixture(scope="module")
def labels(sample_dir) -> list[tuple[str, int]]:
    rows = (line.split("\t") for line in (sample_dir / "labels.tsv").read_text().splitlines() if line.strip())
    return [(name, int(label)) for name, label in rows]


@pytest.fixture(scope="module")
def shards(sample_dir, labels, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    listing = tmp / "imagenet-sample.txt"  # absolute paths, labels from labels.tsv
    listing.write_text("".join(f"{sample_dir / name}\t{label}\n" for name, label in labels))
    manifest = build_shards(listing, tmp / "shards", workers=2, shard_size=SHARD_SIZE)
    return tmp / "shards", manifest


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_all_images_are_kept_byte_identical(shards, sample_dir, labels):
    out, manifest = shards
    assert manifest["num_samples"] == len(labels) == NUM_IMAGES
    assert manifest["skipped"] == [] and manifest["reencoded"] == {}
    assert len(manifest["shards"]) == 3
    assert verify_shards(out).ok


def test_webdataset_and_dali_read_the_same_samples(shards, sample_dir, labels):
    out, manifest = shards
    expected = {
        f"{idx:09d}": (idx, label, digest((sample_dir / name).read_bytes()))
        for idx, (name, label) in enumerate(labels)
    }
    assert read_with_webdataset(out, manifest) == expected
    pytest.importorskip("nvidia.dali")  # the `dali` extra
    assert read_with_dali(out, manifest) == expected


def read_with_webdataset(out: Path, manifest: dict) -> dict:
    import webdataset as wds

    urls = [str(tar) for tar, _ in shard_files(out, manifest)]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        idx = int(np.frombuffer(sample["idx"], "<i8")[0])
        assert int(sample["cls"]) == int(np.frombuffer(sample["label"], "<i8")[0])
        samples[sample["__key__"]] = (idx, int(sample["cls"]), digest(sample["jpg"]))
    return samples


def read_with_dali(out: Path, manifest: dict) -> dict:
    from nvidia.dali import fn, pipeline_def, types

    files = shard_files(out, manifest)
    batch_size = 50  # divides the 400 samples: one epoch is exactly 8 batches

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def reader():
        jpg, idx, label = fn.readers.webdataset(
            paths=[str(tar) for tar, _ in files],
            index_paths=[str(index_file) for _, index_file in files],
            ext=["jpg", "idx", "label"],
            dtypes=[types.UINT8, types.INT64, types.INT64],
            name="reader",
        )
        return jpg, idx, label

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("reader") == NUM_IMAGES
    samples = {}
    for _ in range(NUM_IMAGES // batch_size):
        jpgs, indexes, labels = pipe.run()
        for i in range(batch_size):
            # source_info: "<tar path>:<data offset>:<member name>"
            key = jpgs[i].source_info().rsplit(":", 1)[1].partition(".")[0]
            idx, label = int(np.array(indexes[i])[0]), int(np.array(labels[i])[0])
            samples[key] = (idx, label, digest(np.array(jpgs[i]).tobytes()))
    return samples
