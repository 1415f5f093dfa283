"""Shard files that changed after make_shards wrote them: named before training starts."""
import shutil

import pytest

from pirl_trainer import pipelines
from pirl_trainer.pipelines.shard_index import ShardIndexError, data_files, verify_checksums
from tests.train.conftest import tiny_overrides
from pirl_trainer.train import pirl


@pytest.fixture()
def copied(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    return out


def test_intact_shards_pass_the_checksums(copied):
    seen = []
    verify_checksums(copied, progress=seen.append)
    assert sum(seen) == sum(size for _, size, _ in data_files(copied))


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_a_truncated_shard_is_named_when_the_loader_is_built(copied, small_recipe, backend):
    tar = sorted(copied.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-1024])
    with pytest.raises(ShardIndexError, match=rf"{tar.name}: .* bytes, .*manifest.json says .*truncated"):
        pipelines.make_loader(backend, str(copied), small_recipe, batch_size=4, num_workers=0)


def test_an_altered_shard_is_named_by_the_checksums_and_training_refuses_it(copied, tmp_path):
    tar = sorted(copied.glob("*.tar"))[2]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size: only the sha256 can tell
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardIndexError, match=rf"{tar.name}: sha256 .* differs from the manifest's"):
        verify_checksums(copied)
    with pytest.raises(ShardIndexError, match=tar.name):
        pirl.main([*tiny_overrides(copied, tmp_path / "run"), "--data.verify_sha256=true"])


def test_a_missing_shard_is_named(copied, small_recipe):
    tar = sorted(copied.glob("*.tar"))[0]
    tar.unlink()
    with pytest.raises(ShardIndexError, match=rf"{tar.name}: listed in .* but missing"):
        pipelines.make_loader("reference", str(copied), small_recipe, batch_size=4, num_workers=0)
    with pytest.raises(ShardIndexError, match="but missing"):
        verify_checksums(copied)
