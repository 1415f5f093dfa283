"""ImageNet as distributed (Kaggle's layout): class folders for train, a flat val folder and LOC_val_solution.csv.

The val shards must carry train's class index: a val image of class n01484850 gets the label that train gives
n01484850, whatever classes val holds and in whatever order its CSV lists them.
"""
import csv
import shutil
from pathlib import Path

import pytest

from pirl_trainer.pipelines.shard_index import ShardReader, build_sample_table
from pirl_trainer.tools.make_shards import build_shards, main
from pirl_trainer.pipelines.shard_format import read_manifest as load_manifest
from pirl_trainer.tools.sharding.sources import SourceError, read_labels
from tests.tools import image_factory as make

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # ImageNet's first four synsets, sorted
# val: file number -> synset. Val lacks n01443537 (index 1 in train), so its own sorted names would shift the
# later classes down by one; the CSV lists the rows out of order, as Kaggle's does.
VAL = {1: "n01484850", 2: "n01440764", 3: "n01491361", 4: "n01484850", 5: "n01440764", 6: "n01491361"}
CSV_ORDER = [4, 1, 6, 2, 5, 3]


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


def prediction(number: int, boxes: int) -> str:
    """Kaggle's PredictionString: the synset and four box corners, once per box."""
    return " ".join(f"{VAL[number]} {10 * b} {5 + b} {40 + b} {30 - b}" for b in range(boxes))


def write_csv(path: Path, numbers, extra_rows=()) -> Path:
    return write_csv_rows(path, [(val_name(n), prediction(n, boxes=1 + n % 3)) for n in numbers] + list(extra_rows))


def write_csv_rows(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """train/<wnid>/*.JPEG (2 a class), val/ILSVRC2012_val_*.JPEG (6), LOC_val_solution.csv; each image distinct,
    so that a sample's bytes say which file it came from."""
    root = tmp_path_factory.mktemp("ILSVRC")
    files: dict[bytes, str] = {}
    for c, wnid in enumerate(WNIDS):
        for k in range(2):
            path = root / "train" / wnid / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make.rgb_jpeg(32, 24, seed=100 + 2 * c + k))
            files[path.read_bytes()] = path.name
    (root / "val").mkdir()
    for number in VAL:
        path = root / "val" / f"{val_name(number)}.JPEG"
        path.write_bytes(make.rgb_jpeg(24, 32, seed=number))
        files[path.read_bytes()] = path.name
    assert len(files) == 8 + 6
    write_csv(root / "LOC_val_solution.csv", CSV_ORDER)
    assert main(["--input", str(root / "train"), "--output", str(root / "shards" / "train"), "--workers", "0",
                 "--no-progress"]) == 0
    return root, files


def samples(shard_dir: Path, files: dict[bytes, str]) -> list[tuple[str, int]]:
    """(source file name, label) of every sample in idx order, read back with the loaders' reader."""
    reader = ShardReader(build_sample_table(shard_dir))
    try:
        return [(files[bytes(s.jpg)], s.label) for s in map(reader.read, range(reader.table.num_samples))]
    finally:
        reader.close()


def test_val_shards_get_trains_class_index_by_name(layout, capsys):
    root, files = layout
    train = root / "shards" / "train"
    assert load_manifest(train)["classes"] == WNIDS
    assert samples(train, files) == [(f"{w}_{k}.JPEG", c) for c, w in enumerate(WNIDS) for k in range(2)]
    out = root / "shards" / "val"
    assert main(["--input", str(root / "val"), "--labels", str(root / "LOC_val_solution.csv"), "--classes", str(train),
                 "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == WNIDS and manifest["labelled"] and manifest["num_samples"] == 6
    # sorted file order (not the CSV's), each label the position of the CSV's synset in train's list
    assert samples(out, files) == [(f"{val_name(n)}.JPEG", WNIDS.index(VAL[n])) for n in sorted(VAL)]
    assert [WNIDS.index(VAL[n]) for n in sorted(VAL)] == [2, 0, 3, 2, 0, 3]
    assert manifest["source"] == {"kind": "labelled-folder", "path": str((root / "val").resolve()),
                                  "labels": str((root / "LOC_val_solution.csv").resolve()),
                                  "classes": str(train.resolve())}


def test_without_classes_the_index_is_the_sorted_names_of_the_labels(layout, tmp_path):
    root, files = layout
    manifest = build_shards(root / "val", tmp_path / "val", workers=0, labels=root / "LOC_val_solution.csv")
    own = ["n01440764", "n01484850", "n01491361"]
    assert manifest["classes"] == own  # n01443537 is absent: the last two move down a place against train's
    assert samples(tmp_path / "val", files) == [(f"{val_name(n)}.JPEG", own.index(VAL[n])) for n in sorted(VAL)]


def test_kaggle_csv_first_token_is_the_class_whatever_the_boxes(layout):
    root = layout[0]
    labels = read_labels(root / "LOC_val_solution.csv")
    assert {key: name for key, (name, _) in labels.items()} == {val_name(n): VAL[n] for n in VAL}
    assert labels[val_name(4)][1] == 2 and labels[val_name(3)][1] == 7  # line numbers, the header being line 1


@pytest.mark.parametrize("case", ["unknown class", "missing file", "unlisted file", "duplicate", "tab unknown class"])
def test_labels_that_do_not_fit_are_refused_naming_the_culprit_and_nothing_is_written(layout, tmp_path, capsys,
                                                                                       case):
    root = layout[0]
    labels = tmp_path / "labels.csv"
    if case == "unknown class":
        write_csv(labels, CSV_ORDER[:3], [(val_name(2), "n09999999 1 2 3 4")] + [
            (val_name(n), prediction(n, 2)) for n in CSV_ORDER[4:]])
        culprit = f"{labels}:5: class 'n09999999' is not a class of --classes"
    elif case == "missing file":
        write_csv(labels, CSV_ORDER, [(val_name(7), "n01440764 1 2 3 4")])
        culprit = f"{labels}:8: listed image '{val_name(7)}' has no file in {root / 'val'} (1 of 7"
    elif case == "unlisted file":
        write_csv(labels, [n for n in CSV_ORDER if n != 5])
        culprit = f"{root / 'val' / val_name(5)}.JPEG is not in --labels {labels} (1 unlisted file(s))"
    elif case == "duplicate":
        write_csv(labels, CSV_ORDER, [(val_name(1), prediction(1, 1))])
        culprit = f"{labels}:8: '{val_name(1)}' is listed again (first on line 3)"
    else:
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f"{val_name(n)}.JPEG\t{VAL[n] if n != 4 else 'n0148485'}\n" for n in sorted(VAL)))
        culprit = f"{labels}:4: class 'n0148485' is not a class of --classes {root / 'shards' / 'train'}"
    out = tmp_path / "out"
    status = main(["--input", str(root / "val"), "--labels", str(labels), "--classes", str(root / "shards" / "train"),
                   "--output", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and culprit in err, err
    assert not out.exists()


def test_a_tab_list_of_file_names_and_class_names(layout, tmp_path):
    root, files = layout
    labels = tmp_path / "val.txt"  # file names with their extension, this time
    labels.write_text("".join(f"{val_name(n)}.JPEG\t{VAL[n]}\n" for n in (3, 1, 2, 6, 5, 4)))
    build_shards(root / "val", tmp_path / "val", workers=0, labels=labels, classes=root / "shards" / "train")
    assert samples(tmp_path / "val", files) == [(f"{val_name(n)}.JPEG", WNIDS.index(VAL[n])) for n in sorted(VAL)]


def test_a_list_with_class_names(layout, tmp_path):
    root, files = layout
    listing = tmp_path / "list.txt"
    images = [(root / "val" / f"{val_name(n)}.JPEG", VAL[n]) for n in (5, 1, 3)]
    listing.write_text("".join(f"{path}\t{wnid}\n" for path, wnid in images))
    manifest = build_shards(listing, tmp_path / "own", workers=0)
    own = ["n01440764", "n01484850", "n01491361"]  # the sorted names of the list
    assert manifest["classes"] == own
    assert samples(tmp_path / "own", files) == [(path.name, own.index(wnid)) for path, wnid in images]  # list order
    manifest = build_shards(listing, tmp_path / "train_index", workers=0, classes=root / "shards" / "train")
    assert manifest["classes"] == WNIDS
    assert samples(tmp_path / "train_index", files) == [(path.name, WNIDS.index(wnid)) for path, wnid in images]
    listing.write_text(f"{images[0][0]}\tn01440764\n{images[1][0]}\tn01443538\n")
    with pytest.raises(SourceError, match=f"{listing}:2: class 'n01443538' is not a class of --classes"):
        build_shards(listing, tmp_path / "bad", workers=0, classes=root / "shards" / "train")
    assert not (tmp_path / "bad").exists()


def test_classes_for_class_folders_map_them_by_name(layout, tmp_path):
    root, files = layout
    same = build_shards(root / "train", tmp_path / "same", workers=0, classes=root / "shards" / "train")
    assert same["classes"] == WNIDS
    assert [p.read_bytes() for p in sorted((tmp_path / "same").glob("*.tar"))] == [
        p.read_bytes() for p in sorted((root / "shards" / "train").glob("*.tar"))]
    # an index in another order, with a class the folders lack: labels follow the index, read in its order
    names = tmp_path / "names.txt"
    order = ["n01491361", "n09999999", "n01440764", "n01484850", "n01443537"]
    names.write_text("\n".join(order) + "\n\n")
    manifest = build_shards(root / "train", tmp_path / "mapped", workers=0, classes=names)
    assert manifest["classes"] == order
    expected = [(f"{w}_{k}.JPEG", order.index(w)) for w in sorted(WNIDS, key=order.index) for k in range(2)]
    assert samples(tmp_path / "mapped", files) == expected
    # a folder outside the index
    shutil.copytree(root / "train", tmp_path / "train")
    (tmp_path / "train" / "n01443537").rename(tmp_path / "train" / "n01443538")
    with pytest.raises(SourceError, match="class folder 'n01443538' is not a class of --classes"):
        build_shards(tmp_path / "train", tmp_path / "bad", workers=0, classes=root / "shards" / "train")
    assert not (tmp_path / "bad").exists()


def test_the_beton_format_takes_the_same_inputs(layout, tmp_path):
    pytest.importorskip("ffcv")
    from pirl_trainer.tools.sharding.beton import BETON_NAME, read_beton

    root, files = layout
    out = tmp_path / "val-beton"
    assert main(["--input", str(root / "val"), "--labels", str(root / "LOC_val_solution.csv"), "--classes",
                 str(root / "shards" / "train"), "--output", str(out), "--format", "beton", "--workers", "1",
                 "--no-progress"]) == 0
    assert load_manifest(out)["classes"] == WNIDS
    got = [(files[bytes(s.data)], s.label) for s in read_beton(out / BETON_NAME)]
    assert got == [(f"{val_name(n)}.JPEG", WNIDS.index(VAL[n])) for n in sorted(VAL)]
    bad = tmp_path / "bad.csv"
    write_csv(bad, CSV_ORDER[1:])
    with pytest.raises(SourceError, match="is not in --labels"):
        from pirl_trainer.tools.sharding.beton import build_beton
        build_beton(root / "val", tmp_path / "bad-beton", labels=bad, classes=root / "shards" / "train")
    assert not (tmp_path / "bad-beton").exists()


def test_real_imagenet_photos_get_the_labels_of_their_synsets(tmp_path):
    """400 ImageNet photos as a flat folder with a Kaggle-style CSV and ImageNet's 1000 synsets as the index: each
    label must be the photo's class index in labels.tsv (sorted-wnid order, as class folders would give)."""
    import hashlib
    import os

    real = os.environ.get("PIRL_REAL_DATA")
    if not real:
        pytest.skip("PIRL_REAL_DATA is not set")
    sample = Path(real) / "imagenet-sample"
    rows = [line.split("\t") for line in (sample / "classes.tsv").read_text().splitlines()[1:] if line.strip()]
    wnids = [wnid for _, wnid, _ in rows]
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    expected = {name: int(label) for name, label in
                (line.split("\t") for line in (sample / "labels.tsv").read_text().splitlines() if line.strip())}
    val = tmp_path / "val"
    val.mkdir()
    for name in expected:
        (val / name).symlink_to(sample / name)  # the photos stay where they are
    solution = write_csv_rows(tmp_path / "LOC_val_solution.csv",
                              [(Path(name).stem, f"{wnids[label]} 0 0 10 10") for name, label in expected.items()])
    names = tmp_path / "synsets.txt"
    names.write_text("".join(f"{wnid}\n" for wnid in wnids))
    with pytest.raises(SourceError, match=f"{sample / 'classes.tsv'} is not in --labels .* \\(2 unlisted file"):
        build_shards(sample, tmp_path / "refused", labels=solution, classes=names)  # the folder's .tsv files
    manifest = build_shards(val, tmp_path / "shards", workers=2, labels=solution, classes=names)
    assert manifest["classes"] == wnids and manifest["num_samples"] == 400
    reader = ShardReader(build_sample_table(tmp_path / "shards"))
    by_digest = {hashlib.sha256((sample / name).read_bytes()).digest(): name for name in expected}
    got = [(by_digest[hashlib.sha256(s.jpg).digest()], s.label) for s in map(reader.read, range(400))]
    reader.close()
    assert got == sorted(expected.items())
