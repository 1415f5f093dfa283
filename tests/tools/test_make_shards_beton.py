"""make_shards --format beton: the same checks, idx, labels and manifest as the WebDataset output, in one FFCV file."""
import hashlib
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pirl_trainer.pipelines.shard_index import ShardReader, build_sample_table
from tests.tools.conftest import SHARD_SIZE
from pirl_trainer.tools.make_shards import main
from pirl_trainer.pipelines.shard_format import read_manifest as load_manifest

pytest.importorskip("ffcv")

from pirl_trainer.tools.sharding.beton import (  # noqa: E402  (needs ffcv)
    BETON_NAME, MODE_JPG, MODE_RAW, build_beton, read_beton, verify_beton,
)


def shard_triples(shard_dir: Path) -> list[tuple[int, int | None, bytes]]:
    """(index, label, JPEG bytes) of every sample of a WebDataset shard folder, in idx order."""
    reader = ShardReader(build_sample_table(shard_dir))
    try:
        return [(s.index, s.label, bytes(s.jpg)) for s in map(reader.read, range(reader.table.num_samples))]
    finally:
        reader.close()


def beton_triples(out: Path) -> list[tuple[int, int | None, bytes]]:
    samples = list(read_beton(out / BETON_NAME))
    assert all(s.mode == MODE_JPG for s in samples)
    return [(s.index, s.label, bytes(s.data)) for s in samples]


@pytest.fixture(scope="module")
def from_folder(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton") / "beton"
    return out, build_beton(tree[0], out, workers=0, shard_size=SHARD_SIZE)


def test_folder_input_gives_the_webdataset_checks_idx_labels_and_manifest(from_folder, tree_shards):
    (out, manifest), (wds, wds_manifest) = from_folder, tree_shards
    assert sorted(os.listdir(out)) == [BETON_NAME, "manifest.json", "sample_names.txt"]  # the temporary shards are gone
    assert manifest["format"] == "beton" and manifest["shards"] == []
    same = ("num_samples", "labelled", "classes", "num_skipped", "skipped_by_reason", "reencoded", "source")
    assert {k: manifest[k] for k in same} == {k: wds_manifest[k] for k in same}
    assert manifest["skipped"] == wds_manifest["skipped"]  # the same files skipped, with the same reasons
    beton = manifest["beton"]
    assert beton["samples"] == 13 and beton["stored"] == {"jpg": 13, "raw": 0}
    assert beton["bytes"] == (out / BETON_NAME).stat().st_size
    assert beton["fields"] == {"image": "RGBImageField", "index": "IntField", "label": "IntField"}
    assert beton_triples(out) == shard_triples(wds)  # same idx, label and JPEG bytes (re-encoded ones included)
    assert verify_beton(out).ok


def test_converting_webdataset_shards_keeps_every_triple(tree_shards, tmp_path):
    wds, wds_manifest = tree_shards
    manifest = build_beton(wds, tmp_path / "beton", workers=2)
    assert beton_triples(tmp_path / "beton") == shard_triples(wds)
    digest = hashlib.sha256((wds / "manifest.json").read_bytes()).hexdigest()
    assert manifest["source"] == {"kind": "webdataset", "path": str(wds.resolve()), "manifest_sha256": digest}
    assert manifest["skipped"] == wds_manifest["skipped"] and manifest["classes"] == wds_manifest["classes"]
    assert verify_beton(tmp_path / "beton").ok


def test_samples_stored_raw_hold_the_reference_decode(tree_shards, tmp_path):
    from pirl_trainer.pipelines.views import decode

    wds = tree_shards[0]
    manifest = build_beton(wds, tmp_path / "beton", workers=1, compress_probability=0.5)
    stored = manifest["beton"]["stored"]
    assert stored["raw"] > 0 and stored["jpg"] > 0 and sum(stored.values()) == 13
    for sample, (index, label, jpg) in zip(read_beton(tmp_path / "beton" / BETON_NAME), shard_triples(wds)):
        assert (sample.index, sample.label) == (index, label)
        if sample.mode == MODE_RAW:
            pixels = np.asarray(sample.data).reshape(sample.height, sample.width, 3)
            assert np.array_equal(pixels, decode(jpg).permute(1, 2, 0).numpy())
        else:
            assert bytes(sample.data) == jpg
    assert verify_beton(tmp_path / "beton").ok
    again = build_beton(wds, tmp_path / "again", workers=1, compress_probability=0.5)
    assert again["beton"]["stored"] == stored  # the choice is drawn from the idx: same input, same file


def test_verify_finds_changed_bytes_and_stray_files(from_folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(from_folder[0], out)
    assert main(["--verify", str(out)]) == 0
    (out / "notes.txt").write_text("x")
    (out / "dataset.beton.tmp").write_bytes(b"partial")
    data = bytearray((out / BETON_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / BETON_NAME).write_bytes(bytes(data))
    problems = verify_beton(out).problems
    assert any("sha256 differs" in p for p in problems)
    assert any(p.startswith("notes.txt: file not in the manifest") for p in problems)
    assert any(p.startswith("dataset.beton.tmp: stale temporary file") for p in problems)
    assert main(["--verify", str(out)]) == 1


def test_command_line(tree, tree_shards, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--input", str(tree[0]), "--output", str(out), "--workers", "0", "--no-progress", "--format", "beton"]
    assert main(args) == 0
    assert "kept 13, skipped 11 (1 .beton file" in capsys.readouterr().out
    assert main(args) == 2  # a second run refuses the non-empty output
    assert main(["--verify", str(out)]) == 0
    with pytest.raises(SystemExit):  # --compress-probability is a beton option
        main(["--input", str(tree[0]), "--output", str(tmp_path / "x"), "--compress-probability", "0.5"])
    # A shard folder is converted as stored: re-encoding options do not apply to it.
    assert main(["--input", str(tree_shards[0]), "--output", str(tmp_path / "y"), "--format", "beton",
                 "--max-side", "64"]) == 2
    assert "--max-side" in capsys.readouterr().err


def test_shards_that_fail_verification_are_not_converted(tree_shards, tmp_path):
    wds = tmp_path / "wds"
    shutil.copytree(tree_shards[0], wds)
    first = sorted(wds.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fail verification"):
        build_beton(wds, tmp_path / "beton")


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patch must reach FFCV's writer processes")
def test_a_sample_failing_in_the_writer_fails_the_conversion(tree_shards, tmp_path, monkeypatch):
    """FFCV's writer would wait forever for a sample whose process raised: the error is reported instead."""
    from pirl_trainer.tools.sharding import beton

    def broken(jpg, raw):
        raise OSError("disk on fire")

    monkeypatch.setattr(beton._StoredImages, "_image", staticmethod(broken))
    with pytest.raises(ValueError, match=r"13 sample\(s\) could not be converted, e.g. .* sample 0+\d+: OSError: disk"):
        build_beton(tree_shards[0], tmp_path / "beton", workers=2)
    assert os.listdir(tmp_path / "beton") == []


def test_unlabelled_list_has_no_label_field(tree, tmp_path):
    root = tree[0]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root}/d_more/00.jpg\n{root}/d_more/01.jpg\n{root}/a_good/zero.jpg\n")
    manifest = build_beton(listing, tmp_path / "beton", workers=0, jpeg_quality=80)
    assert (manifest["labelled"], manifest["classes"], manifest["num_samples"]) == (False, None, 2)
    assert manifest["options"]["jpeg_quality"] == 80
    assert [s["reason"].split(":")[0] for s in manifest["skipped"]] == ["empty file"]
    samples = list(read_beton(tmp_path / "beton" / BETON_NAME))
    assert [(s.index, s.label) for s in samples] == [(0, None), (1, None)]
    assert bytes(samples[0].data) == (root / "d_more" / "00.jpg").read_bytes()
    assert verify_beton(tmp_path / "beton").ok
    assert load_manifest(tmp_path / "beton")["beton"]["fields"] == {"image": "RGBImageField", "index": "IntField"}


def test_real_photos_round_trip(tmp_path):
    """Every imagenet-sample photo in the .beton with its label, its index (labels.tsv order) and its bytes."""
    root = os.environ.get("PIRL_REAL_DATA")
    if not root:
        pytest.skip("PIRL_REAL_DATA is not set")
    sample_dir = Path(root) / "imagenet-sample"
    rows = [line.split("\t") for line in (sample_dir / "labels.tsv").read_text().splitlines() if line.strip()]
    manifest = build_beton(sample_dir / "labels.tsv", tmp_path / "beton", workers=2)
    assert manifest["num_samples"] == len(rows) == 400 and manifest["skipped"] == []
    assert manifest["reencoded"] == {}
    expected = [(idx, int(label), (sample_dir / name).read_bytes()) for idx, (name, label) in enumerate(rows)]
    assert beton_triples(tmp_path / "beton") == expected
    assert verify_beton(tmp_path / "beton").ok
