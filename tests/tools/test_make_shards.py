import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.tools.conftest import SHARD_SIZE
from pirl_trainer.tools.make_shards import OutputNotEmptyError, build_shards, main, verify_shards
from pirl_trainer.pipelines.shard_format import decode_int64, read_manifest as load_manifest, shard_files
from pirl_trainer.tools.sharding.shard_writer import ShardWriter

def read_shards(out: Path) -> list[list[dict]]:
    """Every sample of every shard, as {ext: bytes} plus its key, in tar order."""
    shards = []
    for tar_path, _ in shard_files(out, load_manifest(out)):
        samples: list[dict] = []
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
        shards.append(samples)
    return shards


@pytest.fixture(scope="module")
def built(tree_shards, tree):
    """(shard folder, manifest, the tree's expected kept files)."""
    return (*tree_shards, tree[1])


def test_manifest_counts_and_skips(built, tree):
    out, manifest, expected = built
    root = tree[0]
    assert manifest["format_version"] == 1
    assert manifest["num_samples"] == len(expected["kept"]) == 13
    assert manifest["labelled"] is True
    assert manifest["classes"] == ["a_good", "b_empty", "c_convert", "d_more"]
    reasons = {Path(s["path"]).relative_to(root).as_posix(): s["reason"].split(":")[0] for s in manifest["skipped"]}
    assert reasons == {
        "README.txt": "not in a class folder",
        "a_good/.DS_Store": "not an image",
        "a_good/notes.txt": "not an image",
        "a_good/zero.jpg": "empty file",
        "a_good/trunc.jpg": "truncated",
        "a_good/header.jpg": "truncated",
        "a_good/html.jpg": "not an image",
        "a_good/bomb.png": "decompression bomb",
        "a_good/bomb2.jpg": "decompression bomb",
        "a_good/link.jpg": "unreadable",
        "b_empty": "empty class folder",
    }
    assert manifest["num_skipped"] == len(manifest["skipped"]) == sum(manifest["skipped_by_reason"].values()) == 11
    assert manifest["reencoded"] == {"colour_mode": 1, "exif_orientation": 1, "not_jpeg": 2}
    assert manifest["options"]["shard_size"] == SHARD_SIZE
    assert manifest["source"] == {"kind": "folder", "path": str(root.resolve())}


def test_indexes_keys_labels_and_shard_counts(built):
    out, manifest, expected = built
    shards = read_shards(out)
    assert len(shards) == len(manifest["shards"]) > 2
    next_idx = 0
    for record, samples in zip(manifest["shards"], shards):
        assert record["samples"] == len(samples) and record["first_idx"] == next_idx
        assert record["bytes"] == (out / record["file"]).stat().st_size <= SHARD_SIZE
        next_idx += len(samples)
    samples = [s for shard in shards for s in shard]
    indexes = [decode_int64(s["idx"]) for s in samples]
    assert indexes == list(range(manifest["num_samples"]))  # 0..N-1, each once, in input order
    for sample, idx, (path, label, original) in zip(samples, indexes, expected["kept"]):
        assert set(sample) == {"__key__", "jpg", "idx", "cls", "label"}
        assert sample["__key__"] == f"{idx:09d}"
        assert decode_int64(sample["label"]) == label == int(sample["cls"].decode("ascii"))
        assert manifest["classes"][label] == path.parent.name
        if original is not None:
            assert sample["jpg"] == original, path  # valid RGB/greyscale JPEGs keep their bytes
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.mode in ("RGB", "L")
    rotated = Image.open(io.BytesIO(samples[2]["jpg"]))
    assert rotated.size == (32, 48) and rotated.getexif().get(0x0112) is None


def test_index_files_match_dalis_wds2idx(built, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # shipped in the nvidia-dali wheel
    out, manifest, _ = built
    for tar_path, idx_path in shard_files(out, manifest):
        reference = tmp_path / (tar_path.stem + ".idx")
        with wds2idx.IndexCreator(str(tar_path), str(reference), verbose=False) as creator:
            creator.create_index()
        assert idx_path.read_text() == reference.read_text(), idx_path


def test_same_input_gives_identical_shards_with_a_worker_pool(built, tree, tmp_path):
    out, manifest, _ = built
    again = build_shards(tree[0], tmp_path / "again", workers=2, shard_size=SHARD_SIZE)
    assert {k: v for k, v in again.items() if k != "options"} == {k: v for k, v in manifest.items() if k != "options"}
    for record in manifest["shards"]:
        for name in (record["file"], record["index_file"]):
            assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_max_side_reencodes_only_larger_images(tree, tmp_path):
    manifest = build_shards(tree[0], tmp_path / "out", max_side=64, workers=0)
    assert manifest["reencoded"] == {"colour_mode": 1, "exif_orientation": 1, "max_side": 1, "not_jpeg": 2}
    sizes = [Image.open(io.BytesIO(s["jpg"])).size for shard in read_shards(tmp_path / "out") for s in shard]
    assert sizes[4] == (64, 34) and max(max(s) for s in sizes) == 64


def test_list_input_labelled_and_unlabelled(tree, tmp_path):
    root = tree[0]
    labelled = tmp_path / "labelled.txt"
    labelled.write_text(f"{root}/d_more/00.jpg\t5\n{root}/a_good/zero.jpg\t9\n../{tmp_path.name}/missing.jpg\t1\n")
    manifest = build_shards(labelled, tmp_path / "l", workers=0)
    assert manifest["num_samples"] == 1 and manifest["labelled"]
    assert manifest["classes"] == [str(i) for i in range(10)]  # up to the largest label, skipped files included
    assert [s["reason"].split(":")[0] for s in manifest["skipped"]] == ["empty file", "unreadable"]
    assert manifest["skipped"][1]["path"] == str(tmp_path / ".." / tmp_path.name / "missing.jpg")
    assert verify_shards(tmp_path / "l").ok

    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text(f"{root}/d_more/00.jpg\n{root}/d_more/01.jpg\n")
    manifest = build_shards(unlabelled, tmp_path / "u", workers=0)
    assert (manifest["labelled"], manifest["classes"], manifest["num_samples"]) == (False, None, 2)
    assert [sorted(s) for s in read_shards(tmp_path / "u")[0]] == [["__key__", "idx", "jpg"]] * 2
    assert verify_shards(tmp_path / "u").ok


def test_second_run_refuses_and_names_the_folder(built, tree):
    out = built[0]
    with pytest.raises(OutputNotEmptyError, match=re.escape(str(out))):
        build_shards(tree[0], out, workers=0)


def test_stale_tmp_files_are_mentioned(tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000003.tar.tmp").write_bytes(b"partial")
    with pytest.raises(OutputNotEmptyError, match=r"stale \*\.tmp .*shard-000003\.tar\.tmp"):
        build_shards(tree[0], out, workers=0)


def test_output_inside_the_input_folder_is_refused(tree):
    with pytest.raises(ValueError, match="inside"):
        build_shards(tree[0], tree[0] / "shards", workers=0)


def test_interrupted_run_leaves_complete_shards_only(tree, tmp_path, monkeypatch):
    add = ShardWriter.add

    def failing_add(self, idx, key, entries):
        if idx == 8:
            raise KeyboardInterrupt
        add(self, idx, key, entries)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_shards(tree[0], out, workers=0, shard_size=SHARD_SIZE)
    names = sorted(os.listdir(out))
    assert names and not any(n.endswith(".tmp") for n in names) and "manifest.json" not in names
    monkeypatch.undo()
    with pytest.raises(OutputNotEmptyError, match="no manifest.json"):
        build_shards(tree[0], out, workers=0)


def test_verify_accepts_a_good_folder_and_catches_tampering(built, tmp_path):
    assert verify_shards(built[0]).ok

    def tampered(change) -> list[str]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(built[0], copy)
        change(copy)
        report = verify_shards(copy)
        assert not report.ok
        return report.problems

    def flip_a_jpeg_byte(folder):
        path = folder / "shard-000000.tar"
        data = bytearray(path.read_bytes())
        data[600] ^= 0xFF  # inside the first sample's jpg (data starts at 512)
        path.write_bytes(bytes(data))

    def drop_last_shard(folder):
        (folder / "shard-000001.tar").unlink()

    def edit_manifest(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["shards"][0]["samples"] += 1
        (folder / "manifest.json").write_text(json.dumps(manifest))

    def edit_index(folder):
        path = folder / "shard-000000.idx"
        path.write_text(path.read_text().replace(" 512 ", " 1024 ", 1))

    def truncate_tar(folder):
        path = folder / "shard-000000.tar"
        path.write_bytes(path.read_bytes()[:3000])

    assert any("sha256" in p for p in tampered(flip_a_jpeg_byte))
    assert any("shard-000001.tar: missing" in p for p in tampered(drop_last_shard))
    assert any("manifest says" in p for p in tampered(edit_manifest))
    assert any("shard-000000.idx: differs" in p for p in tampered(edit_index))
    assert any("shard-000000.tar" in p for p in tampered(truncate_tar))
    assert any("stale temporary file" in p for p in tampered(lambda f: (f / "x.tar.tmp").write_bytes(b"")))


@pytest.mark.parametrize("evil", ["../escape.jpg", "/etc/passwd", "a/../../b.jpg"])
def test_verify_refuses_member_names_that_point_outside(built, tmp_path, evil):
    """A shard whose tar has a member named like a path outside any folder: reported, never read, never followed
    (shards are only ever read, and member names never become paths)."""
    import io
    import tarfile

    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    path = copy / "shard-000000.tar"
    data = path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src, tarfile.open(fileobj=buf, mode="w:") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
        bad = tarfile.TarInfo(evil)
        bad.size = 3
        dst.addfile(bad, io.BytesIO(b"bad"))
    path.write_bytes(buf.getvalue())
    report = verify_shards(copy)
    assert not report.ok
    assert any(f"unsafe member name {evil!r}" in p for p in report.problems), report.problems
    assert not (tmp_path / "escape.jpg").exists() and not (copy.parent / "b.jpg").exists()


def test_cli_summary_refusal_and_verify(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--input", str(tree[0]), "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^kept 13, skipped 11 \(1 shards, [0-9.]+ MB\) in [0-9.]+ s", captured.out, re.M)
    assert "skipped 2: decompression bomb" in captured.err
    assert main(["--input", str(tree[0]), "--output", str(out), "--workers", "0"]) == 2
    assert f"output folder {out} is not empty" in capsys.readouterr().err
    assert main(["--verify", str(out)]) == 0
    assert "13 samples: OK" in capsys.readouterr().out
    (out / "manifest.json").unlink()
    assert main(["--verify", str(out)]) == 1


def test_script_help_runs_from_the_command_line():
    script = Path(__file__).parents[2] / "tools" / "make_shards.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "REFUSES" in result.stdout and "EXIF orientation" in result.stdout


def test_a_full_disk_is_a_clear_error_and_leaves_no_manifest(tree, tmp_path, capsys, monkeypatch):
    import errno

    from pirl_trainer.tools.sharding import shard_writer

    writes = {"n": 0}
    real_write = shard_writer._HashingFile.write

    def fill_up(self, data):
        writes["n"] += 1
        if writes["n"] > 20:  # the disk fills up part-way through the first shard
            raise OSError(errno.ENOSPC, "No space left on device", str(self._f.name))
        return real_write(self, data)

    monkeypatch.setattr(shard_writer._HashingFile, "write", fill_up)
    out = tmp_path / "out"
    root, _ = tree
    assert main(["--input", str(root), "--output", str(out), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err and "no manifest.json was written" in err
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))  # the shard in progress is removed


def test_labels_and_classes_belong_with_input(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--verify", str(tmp_path), "--classes", str(tmp_path)])
    assert exited.value.code == 2 and "--verify takes no --input/--output/--labels/--classes" in capsys.readouterr().err
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tree[0]}/d_more/00.jpg\td_more\n")
    out = tmp_path / "out"
    assert main(["--input", str(listing), "--labels", str(listing), "--output", str(out), "--workers", "0"]) == 2
    assert f"--input {listing} is a list file" in capsys.readouterr().err and not out.exists()
    # --classes from a shard folder of class folders: the list's name gets that folder's label
    classes = tmp_path / "classes"
    assert main(["--input", str(tree[0]), "--output", str(classes), "--workers", "0", "--no-progress"]) == 0
    assert main(["--input", str(listing), "--classes", str(classes), "--output", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == ["a_good", "b_empty", "c_convert", "d_more"]
    assert [decode_int64(s["label"]) for s in read_shards(out)[0]] == [3]
