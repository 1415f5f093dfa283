"""Shard files that changed after make_shards wrote them: named before training starts."""
import shutil

import pytest

import pipelines
from pipelines.shard_index import ShardIndexError, data_files, verify_checksums
from tests.train.conftest import tiny_overrides
from train import pirl


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


def claim_huge_size(jpg: bytes) -> bytes:
    """The same JPEG whose SOF header claims 30,000 x 30,000 pixels (900 M): same length, a decompression bomb."""
    data = bytearray(jpg)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5:at + 9] = (30000).to_bytes(2, "big") * 2  # height, width after length and precision
            return bytes(data)
    raise AssertionError("no SOF marker")


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_a_header_claiming_an_absurd_size_is_refused_at_load_time(copied, small_recipe, backend):
    """make_shards refuses such files; shards written elsewhere or altered are checked again before decoding."""
    from pipelines.shard_index import ShardReader, build_sample_table

    table = build_sample_table(copied)
    raw = ShardReader(table).read(5)
    shard = table.tar_paths[int(table.shard[5])]
    offset = int(table.start[5]) + int(table.jpg_at[5])
    with open(shard, "r+b") as f:  # the bytes change, the size does not: only sha256 would notice
        f.seek(offset)
        f.write(claim_huge_size(bytes(raw.jpg)))
    loader = pipelines.make_loader(backend, str(copied), small_recipe, batch_size=31, num_workers=0, mode="eval")
    loader.set_epoch(0)
    with pytest.raises(Exception, match=r"sample 000000005.*30000x30000 = 900,000,000 pixels.*decompression bomb"):
        next(iter(loader))
