import json
import shutil

import pytest
import webdataset as wds

from pirl_trainer.pipelines.shard_format import parse_index_line
from pirl_trainer.pipelines.shard_index import ShardIndexError, ShardReader, build_sample_table
from pirl_trainer.tools.make_shards import build_shards


def test_table_and_reads_match_a_sequential_webdataset_read(small_shards):
    table = build_sample_table(small_shards)
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert table.num_samples == manifest["num_samples"] == 31
    assert table.labelled and table.classes == ["class0", "class1", "class2"]
    reader = ShardReader(table)
    urls = [str(small_shards / s["file"]) for s in manifest["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        i = int(sample["__key__"])
        raw = reader.read(i)
        assert bytes(raw.jpg) == sample["jpg"]
        assert raw.index == i == int.from_bytes(sample["idx"], "little")
        assert raw.label == int(sample["cls"]) == int.from_bytes(sample["label"], "little")
        seen.append(i)
    assert seen == list(range(31))  # stable global index = position in input order
    reader.close()


def test_parse_index_line():
    line = "jpg 512 7470 000000000.jpg idx 8704 8 000000000.idx"
    assert parse_index_line(line) == {"jpg": (512, 7470, "000000000.jpg"), "idx": (8704, 8, "000000000.idx")}
    with pytest.raises(ValueError, match="groups of 4"):
        parse_index_line("jpg 512 7470")


def test_reader_keeps_few_descriptors_open(small_shards):
    table = build_sample_table(small_shards)
    reader = ShardReader(table, max_open=2)
    for i in range(table.num_samples):
        assert reader.read(i).index == i
        assert len(reader._fds) <= 2
    reader.close()


@pytest.fixture
def shard_copy(small_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    return out


def test_missing_manifest_is_named(shard_copy):
    (shard_copy / "manifest.json").unlink()
    with pytest.raises(ShardIndexError, match="manifest.json: no manifest"):
        build_sample_table(shard_copy)


def test_missing_tar_is_named(shard_copy):
    (shard_copy / "shard-000002.tar").unlink()
    with pytest.raises(ShardIndexError, match="shard-000002.tar: listed in .*manifest.json but missing"):
        build_sample_table(shard_copy)


def test_bad_index_header_is_named(shard_copy):
    path = shard_copy / "shard-000001.idx"
    path.write_text("v9 7\n" + path.read_text().split("\n", 1)[1])
    with pytest.raises(ShardIndexError, match="shard-000001.idx: header"):
        build_sample_table(shard_copy)


def test_index_of_another_shard_is_caught(shard_copy):
    shutil.copy(shard_copy / "shard-000003.idx", shard_copy / "shard-000002.idx")
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["shards"][2]["samples"] = manifest["shards"][3]["samples"]
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardIndexError, match=r"shard-000002.idx:2: key '\d+', expected"):
        build_sample_table(shard_copy)


def test_truncated_tar_is_caught_by_its_size_and_as_a_stale_index(shard_copy):
    tar = shard_copy / "shard-000004.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    with pytest.raises(ShardIndexError, match="shard-000004.tar: 2048 bytes, .*manifest.json says .*truncated"):
        build_sample_table(shard_copy)
    # A manifest rewritten for the short file (but not its index) is still caught, by the index.
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["shards"][4]["bytes"] = 2048
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardIndexError, match="shard-000004.idx:.*past the end of .*shard-000004.tar"):
        build_sample_table(shard_copy)


def test_idx_member_disagreeing_with_the_table_is_caught_on_read(shard_copy):
    table = build_sample_table(shard_copy)
    i = 8
    tar = shard_copy / table.tar_paths[int(table.shard[i])].rsplit("/", 1)[-1]
    data = bytearray(tar.read_bytes())
    at = int(table.start[i]) + int(table.idx_at[i])
    data[at:at + 8] = (99).to_bytes(8, "little")
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardIndexError, match="sample 000000008 carries idx 99"):
        ShardReader(table).read(i)


def test_unlabelled_shards_from_a_list_file(small_shards, tmp_path):
    images = sorted((small_shards.parent / "images").rglob("*.jpg"))[:5]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    build_shards(listing, tmp_path / "shards", workers=0)
    table = build_sample_table(tmp_path / "shards")
    assert not table.labelled and table.classes is None and table.num_samples == 5
    raw = ShardReader(table).read(4)
    assert raw.index == 4 and raw.label is None and bytes(raw.jpg[:2]) == b"\xff\xd8"


def test_lines_with_members_in_another_order_parse_the_same(shard_copy):
    before = build_sample_table(shard_copy)
    path = shard_copy / "shard-000001.idx"
    lines = path.read_text().splitlines()
    fields = lines[2].split()
    lines[2] = " ".join(fields[4:] + fields[:4])  # jpg group last on one line: the line-by-line parse
    path.write_text("\n".join(lines) + "\n")
    after = build_sample_table(shard_copy)
    for column in ("start", "length", "jpg_at", "jpg_size", "idx_at", "label_at", "shard"):
        assert (getattr(before, column) == getattr(after, column)).all(), column


def test_malformed_line_is_named_with_its_line_number(shard_copy):
    path = shard_copy / "shard-000001.idx"
    lines = path.read_text().splitlines()
    lines[2] = lines[2] + " extra"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardIndexError, match="shard-000001.idx:3: expected groups of 4"):
        build_sample_table(shard_copy)


def test_labelled_manifest_over_unlabelled_shards_is_caught(small_shards, tmp_path):
    images = sorted((small_shards.parent / "images").rglob("*.jpg"))[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    build_shards(listing, tmp_path / "shards", workers=0)
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(labelled=True, classes=["a"])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardIndexError, match="shard-000000.idx:2: sample has no 'label' member"):
        build_sample_table(tmp_path / "shards")
