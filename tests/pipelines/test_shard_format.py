import json
import re

import numpy as np
import pytest

from pirl_trainer.pipelines.shard_format import (INT64_BYTES, ShardFormatError, decode_int64, encode_int64, index_line,
                                                 index_text, member_name, read_index_file, read_manifest,
                                                 sample_entries, sample_key, split_member_name)
from pirl_trainer.pipelines.shard_index import ShardIndexError

SHARD = {"file": "shard-000000.tar", "index_file": "shard-000000.idx", "samples": 2, "bytes": 10240, "first_idx": 0}
MANIFEST = {"format_version": 1, "num_samples": 2, "labelled": True, "classes": ["a", "b"], "shards": [SHARD],
            "skipped": [], "options": {}, "source": {}}


def write(folder, manifest) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_complete_manifest_reads_from_its_folder_or_its_own_path(tmp_path):
    write(tmp_path / "s", MANIFEST)
    assert read_manifest(tmp_path / "s") == MANIFEST == read_manifest(tmp_path / "s" / "manifest.json")


# the keys some reader uses (docs/data.md), listed here rather than taken from the module under test
@pytest.mark.parametrize("key", ["format_version", "num_samples", "labelled", "classes", "shards", "skipped",
                                 "options", "source"])
def test_every_missing_key_is_named_with_the_file(tmp_path, key):
    write(tmp_path / "s", {k: v for k, v in MANIFEST.items() if k != key})
    with pytest.raises(ShardIndexError, match=re.escape(f"{tmp_path / 's' / 'manifest.json'}: manifest lacks keys "
                                                        f"['{key}']")):
        read_manifest(tmp_path / "s")


@pytest.mark.parametrize("key", ["file", "index_file", "samples", "bytes", "first_idx"])
def test_every_missing_shard_key_is_named(tmp_path, key):
    write(tmp_path / "s", {**MANIFEST, "shards": [SHARD, {k: v for k, v in SHARD.items() if k != key}]})
    with pytest.raises(ShardFormatError, match=re.escape(f"shards[1] lacks keys ['{key}']")):
        read_manifest(tmp_path / "s")


@pytest.mark.parametrize("edit, message", [
    ({"format_version": 2}, "format_version 2, this code reads 1"),
    ({"classes": []}, "labelled is true but classes is empty"),
])
def test_a_manifest_this_code_cannot_read_is_refused(tmp_path, edit, message):
    write(tmp_path / "s", {**MANIFEST, **edit})
    with pytest.raises(ShardFormatError, match=message):
        read_manifest(tmp_path / "s")


def test_a_corrupt_or_missing_manifest_is_refused(tmp_path):
    write(tmp_path / "s", MANIFEST)
    (tmp_path / "s" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ShardFormatError, match="top level is list, expected an object"):
        read_manifest(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(ShardFormatError, match="corrupt manifest, not valid JSON"):
        read_manifest(tmp_path / "s")
    # the readers catch ShardIndexError (a ValueError), make_shards' callers FileNotFoundError: it is both
    for caught in (ShardIndexError, ValueError, FileNotFoundError):
        with pytest.raises(caught, match=re.escape(f"{tmp_path / 'nowhere' / 'manifest.json'}: no manifest")):
            read_manifest(tmp_path / "nowhere")


def test_int64_members_are_eight_little_endian_bytes():
    assert encode_int64(1) == b"\x01" + bytes(7)
    assert encode_int64(-2) == b"\xfe" + b"\xff" * 7
    for value in (0, 1, 255, 256, 2**40 + 3, -1, -(2**63), 2**63 - 1):
        assert len(encode_int64(value)) == INT64_BYTES
        assert decode_int64(encode_int64(value)) == value == int.from_bytes(encode_int64(value), "little", signed=True)
        assert decode_int64(memoryview(b"xx" + encode_int64(value))[2:]) == value
    with pytest.raises(ValueError, match="expected 8 bytes"):
        decode_int64(b"\x01" * 7)


def test_sample_keys_and_members():
    assert sample_key(7) == "000000007" and sample_key(1_281_166) == "001281166"
    assert member_name(sample_key(7), "jpg") == "000000007.jpg"
    assert split_member_name("000000007.tar.gz") == ("000000007", "tar.gz")  # at the first dot, as webdataset
    assert [ext for ext, _ in sample_entries(3, b"J", 5)] == ["jpg", "idx", "cls", "label"]
    assert dict(sample_entries(3, b"J", 5)) == {"jpg": b"J", "idx": encode_int64(3), "cls": b"5",
                                                "label": encode_int64(5)}
    assert [ext for ext, _ in sample_entries(3, b"J", None)] == ["jpg", "idx"]


def test_an_index_file_reads_back_what_was_written(tmp_path):
    samples = [[("jpg", 512, 7470, "000000000.jpg"), ("idx", 8704, 8, "000000000.idx")],
               [("jpg", 9728, 100, "000000001.jpg"), ("idx", 10752, 8, "000000001.idx")]]
    text = index_text([index_line(s) for s in samples])
    assert text == ("v1.2 2\njpg 512 7470 000000000.jpg idx 8704 8 000000000.idx\n"
                    "jpg 9728 100 000000001.jpg idx 10752 8 000000001.idx\n")
    path = tmp_path / "a.idx"
    path.write_text(text)
    columns = read_index_file(path)
    assert len(columns) == 2
    assert columns.offsets["jpg"].tolist() == [512, 9728] and columns.sizes["idx"].tolist() == [8, 8]
    assert columns.names["idx"] == ["000000000.idx", "000000001.idx"]
    # a sample without an idx member: the line-by-line parse, -1 where a member is missing
    path.write_text("v1.2 2\njpg 512 7470 000000000.jpg idx 8704 8 000000000.idx\njpg 9728 100 000000001.jpg\n")
    columns = read_index_file(path)
    assert columns.offsets["idx"].tolist() == [8704, -1]
    assert np.array_equal(columns.offsets["jpg"], [512, 9728])
    path.write_text("v1.2 3\n" + text.split("\n", 1)[1])
    with pytest.raises(ShardFormatError, match=f"{path}: header says 3 samples, found 2 lines"):
        read_index_file(path)
