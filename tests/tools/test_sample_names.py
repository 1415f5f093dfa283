"""sample_names.txt: make_shards names every kept sample by its source (line i = sample i), and the manifest says so."""
import json
import shutil
from pathlib import Path

import pytest

from pirl_trainer.pipelines.shard_index import ShardReader, build_sample_table
from pirl_trainer.pipelines.subset import sample_names
from pirl_trainer.tools.make_shards import build_shards, main, verify_shards
from tests.tools import image_factory as make
from tests.tools.conftest import SHARD_SIZE, build_tree

NAMES = "sample_names.txt"


def lines(out: Path) -> list[str]:
    with open(out / NAMES, encoding="utf-8", newline="\n") as f:
        return f.read().split("\n")[:-1]  # one per sample, each ending in "\n"


def test_folder_input_names_each_kept_sample_by_its_path_under_the_input(tmp_path):
    root = tmp_path / "tree"
    kept = build_tree(root)["kept"]  # in input order, skipped files (11 of them) between
    manifest = build_shards(root, tmp_path / "out", workers=2, shard_size=SHARD_SIZE)
    assert manifest["sample_names"] == NAMES
    names = lines(tmp_path / "out")
    assert names == [path.relative_to(root).as_posix() for path, _, _ in kept]  # 13 lines, none for a skipped file
    reader = ShardReader(build_sample_table(tmp_path / "out"))
    for i, (path, _, original) in enumerate(kept):  # line i is sample i: its stored bytes are that file's
        if original is not None:  # kept byte for byte (not re-encoded)
            assert bytes(reader.read(i).jpg) == original == (root / names[i]).read_bytes(), i
    assert verify_shards(tmp_path / "out").ok


def test_list_input_names_each_sample_by_its_entry_as_written(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    for k, name in enumerate(["a.jpg", "sub/b.jpg", "c.jpg"]):
        (tmp_path / "img" / name).write_bytes(make.rgb_jpeg(seed=k))
    absolute = tmp_path / "img" / "c.jpg"
    (tmp_path / "img" / "bad.jpg").write_bytes(make.TEXT)
    entries = ["./a.jpg\t1", "bad.jpg\t0", "sub/b.jpg\t0", "missing.jpg\t2", f"{absolute}\t2"]
    (tmp_path / "img" / "list.txt").write_text("\n".join(entries) + "\n")
    manifest = build_shards(tmp_path / "img" / "list.txt", tmp_path / "out", workers=0)
    assert manifest["num_samples"] == 3 and manifest["num_skipped"] == 2
    assert lines(tmp_path / "out") == ["./a.jpg", "sub/b.jpg", str(absolute)]


def test_labelled_flat_folder_names_its_files(tmp_path):
    (tmp_path / "val").mkdir()
    for k, name in enumerate(["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG"]):
        (tmp_path / "val" / name).write_bytes(make.rgb_jpeg(seed=k))
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000001\tn01\nILSVRC2012_val_00000002.JPEG\tn02\n")
    build_shards(tmp_path / "val", tmp_path / "out", workers=0, labels=tmp_path / "labels.txt")
    assert lines(tmp_path / "out") == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]


def test_a_newline_inside_a_name_cannot_shift_the_lines(tmp_path):
    (tmp_path / "img" / "k").mkdir(parents=True)
    for k, name in enumerate(["a\nb.jpg", "c\r.jpg", "d.jpg"]):
        (tmp_path / "img" / "k" / name).write_bytes(make.rgb_jpeg(seed=k))
    build_shards(tmp_path / "img", tmp_path / "out", workers=0)
    assert lines(tmp_path / "out") == ["k/a\\nb.jpg", "k/c\\r.jpg", "k/d.jpg"]
    assert sample_names(tmp_path / "out") == ["k/a\\nb.jpg", "k/c\\r.jpg", "k/d.jpg"]  # as the subset reader sees them
    assert verify_shards(tmp_path / "out").ok


@pytest.fixture()
def shards(tmp_path):
    (tmp_path / "img" / "k").mkdir(parents=True)
    for k in range(4):
        (tmp_path / "img" / "k" / f"{k}.jpg").write_bytes(make.rgb_jpeg(seed=k))
    build_shards(tmp_path / "img", tmp_path / "out", workers=0)
    return tmp_path / "out"


def test_verify_checks_the_names_file_and_old_folders_without_one_stay_valid(shards, tmp_path, capsys):
    names = shards / NAMES
    names.write_text("k/0.jpg\nk/1.jpg\n")
    assert verify_shards(shards).problems == [f"{NAMES}: 2 lines, manifest num_samples 4"]
    names.unlink()
    assert verify_shards(shards).problems == [f"{NAMES}: listed in the manifest but missing"]
    assert main(["--verify", str(shards)]) == 1
    assert f"verify: {NAMES}: listed in the manifest but missing" in capsys.readouterr().err
    old = tmp_path / "old"  # a folder written before sample names existed: no key, no file
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["sample_names"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(old).ok
    assert build_sample_table(old).num_samples == 4


def test_a_failed_run_leaves_no_names_file(tmp_path, monkeypatch):
    from pirl_trainer.tools.sharding import shard_writer

    (tmp_path / "img" / "k").mkdir(parents=True)
    (tmp_path / "img" / "k" / "0.jpg").write_bytes(make.rgb_jpeg())

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_writer.ShardWriter, "add", full_disk)
    with pytest.raises(OSError):
        build_shards(tmp_path / "img", tmp_path / "out", workers=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
