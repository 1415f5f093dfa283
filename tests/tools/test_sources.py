import json
import os

import pytest

from pirl_trainer.tools.sharding.sources import (
    ClassIndex, Entry, FolderSource, ListSource, SourceError, open_source, read_class_index,
)


def write(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_order_and_labels_match_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    for name in ["b/2.jpg", "b/10.jpg", "b/sub/1.png", "a/z.jpeg", "a/A.jpg", "C/x.jpg", "a/nested/deeper/q.jpg"]:
        write(tmp_path / name)
    source = FolderSource(tmp_path)
    reference = ImageFolder(str(tmp_path), loader=lambda p: p)
    assert source.classes == reference.classes == ["C", "a", "b"]
    assert [(e.path, e.label) for e in source] == reference.samples


def test_folder_reports_empty_class_stray_files_and_keeps_class_indexes(tmp_path):
    write(tmp_path / "a" / "1.jpg")
    (tmp_path / "b_empty").mkdir()
    write(tmp_path / "c" / "1.jpg")
    write(tmp_path / "README.txt")
    source = FolderSource(tmp_path)
    assert source.classes == ["a", "b_empty", "c"]
    assert list(source) == [
        Entry(str(tmp_path / "README.txt"), skip_reason="not in a class folder"),
        Entry(str(tmp_path / "a" / "1.jpg"), 0, name="a/1.jpg"),
        Entry(str(tmp_path / "b_empty"), skip_reason="empty class folder"),
        Entry(str(tmp_path / "c" / "1.jpg"), 2, name="c/1.jpg"),
    ]


def test_unreadable_class_folder_is_reported(tmp_path, monkeypatch):
    # The fault is injected: folder modes stop no one running as root (as CI and containers do).
    locked = tmp_path / "a"
    write(locked / "1.jpg")
    write(tmp_path / "b" / "2.jpg")
    real_scandir = os.scandir

    def locked_scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", locked_scandir)
    entries = list(FolderSource(tmp_path))
    assert entries == [
        Entry(str(locked), skip_reason="unreadable: folder: PermissionError: Permission denied"),
        Entry(str(tmp_path / "b" / "2.jpg"), 1, name="b/2.jpg"),
    ]


def test_list_resolves_relative_paths_against_the_list_folder(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "train.txt"
    listing.write_text("img/a.jpg\t3\n\n/abs/b.jpg\t0\r\n   \nc.jpg\t12\n")
    source = open_source(listing)
    assert isinstance(source, ListSource) and source.labelled and source.classes is None
    assert list(source) == [
        Entry(str(lists / "img" / "a.jpg"), 3, name="img/a.jpg"),
        Entry("/abs/b.jpg", 0, name="/abs/b.jpg"),
        Entry(str(lists / "c.jpg"), 12, name="c.jpg"),
    ]


def test_unlabelled_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nb c.jpg\n")
    source = ListSource(listing)
    assert not source.labelled
    assert list(source) == [Entry(str(tmp_path / "a.jpg"), name="a.jpg"),
                            Entry(str(tmp_path / "b c.jpg"), name="b c.jpg")]


def test_bad_list_lines_are_skipped_with_their_line_number(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\t1\nb.jpg\nc.jpg\t-2\nd.jpg\tcat\ne.jpg\t1\t2\nx.jpg\t1048576\nf.jpg\t 7 \n")
    reasons = [(e.label, e.skip_reason) for e in ListSource(listing)]
    assert reasons[0] == (1, None)
    assert reasons[-1] == (7, None)
    for number, (label, reason) in enumerate(reasons[1:-1], start=2):
        assert label is None
        assert reason.startswith(f"bad list line: {listing}:{number}: ")


def test_missing_input_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(tmp_path / "nowhere")


def test_list_with_class_names_indexes_the_sorted_names(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\tn02\nb.jpg\tn01\nc.jpg\t7\nd.jpg\nb.jpg\tn02\n")
    source = ListSource(listing)
    assert source.labelled and source.classes == ["7", "n01", "n02"]  # a number is one more name here
    entries = list(source)
    assert [(e.path, e.label) for e in entries if e.skip_reason is None] == [
        (str(tmp_path / "a.jpg"), 2), (str(tmp_path / "b.jpg"), 1), (str(tmp_path / "c.jpg"), 0),
        (str(tmp_path / "b.jpg"), 2)]
    assert entries[3].skip_reason.startswith(f"bad list line: {listing}:4: ")


def test_list_looked_up_in_a_class_index(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\tn02\nb.jpg\t3\n")
    index = ClassIndex(("3", "n05", "n02"), "names.txt")
    assert [e.label for e in ListSource(listing, index)] == [2, 0]
    assert ListSource(listing, index).classes == ["3", "n05", "n02"]
    listing.write_text("a.jpg\tn02\nb.jpg\tn04\nc.jpg\tn04\n")
    with pytest.raises(SourceError, match=f"{listing}:2: class 'n04' is not a class of --classes names.txt "
                                          r"\(2 line\(s\) name a class outside it\)"):
        ListSource(listing, index)
    listing.write_text("a.jpg\n")
    with pytest.raises(SourceError, match="has no labels"):
        ListSource(listing, index)


def test_class_index_from_a_names_file_or_a_manifest(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("n01440764\n\ngreat white shark \nn01484850\n")
    assert read_class_index(names) == ClassIndex(("n01440764", "great white shark", "n01484850"), str(names))
    names.write_text("a\nb\na\n")
    with pytest.raises(SourceError, match=r"class 'a' appears twice \(positions 0 and 2\)"):
        read_class_index(names)
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"format_version": 1, "num_samples": 0, "labelled": True, "classes": ["x", "y"], "shards": [],
                "skipped": [], "options": {}, "source": {}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert read_class_index(shards).names == ("x", "y") == read_class_index(shards / "manifest.json").names
    (shards / "manifest.json").write_text(json.dumps({**manifest, "labelled": False, "classes": None}))
    with pytest.raises(SourceError, match="unlabelled"):
        read_class_index(shards)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_class_index(tmp_path / "nowhere")


def test_labelled_folder_matches_names_and_stems_and_refuses_ambiguity(tmp_path):
    for name in ["b.JPEG", "a.JPEG", "c.png", "c.JPEG"]:
        write(tmp_path / "val" / name)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\tdog\nb.JPEG\tcat\nc.png\tdog\nc.JPEG\tcat\n")
    source = open_source(tmp_path / "val", labels=labels)
    assert source.classes == ["cat", "dog"]
    assert list(source) == [Entry(str(tmp_path / "val" / n), label, name=n) for n, label in
                            [("a.JPEG", 1), ("b.JPEG", 0), ("c.JPEG", 0), ("c.png", 1)]]
    labels.write_text("a\tdog\nb\tcat\nc\tdog\n")
    with pytest.raises(SourceError, match=f"{labels}:3: 'c' matches 2 files in .*: 'c.JPEG' and 'c.png'"):
        open_source(tmp_path / "val", labels=labels)
    labels.write_text("a\tdog\nb.JPEG\tcat\nb\tcat\nc.png\tdog\nc.JPEG\tcat\n")
    with pytest.raises(SourceError, match=f"{labels}:3: 'b' and line 2 \\('b.JPEG'\\) both label"):
        open_source(tmp_path / "val", labels=labels)


@pytest.mark.parametrize("text, match", [
    ("a.JPEG,cat\n", "neither Kaggle's CSV"),
    ("a\tcat\tdog\n", r":1: 3 TAB-separated fields"),
    ("ImageId,PredictionString\na,\n", r":2: no class"),
    ("ImageId,PredictionString\na,cat 1 2 3 4,x\n", r":2: 3 comma-separated fields"),
])
def test_bad_labels_files_name_the_line(tmp_path, text, match):
    write(tmp_path / "val" / "a.JPEG")
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    with pytest.raises(SourceError, match=match):
        open_source(tmp_path / "val", labels=labels)


def test_labels_take_a_flat_folder_only(tmp_path):
    write(tmp_path / "val" / "a.JPEG")
    write(tmp_path / "val" / "sub" / "b.JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\tcat\n")
    with pytest.raises(SourceError, match="'sub' is a folder; --labels takes a flat folder"):
        open_source(tmp_path / "val", labels=labels)
    listing = tmp_path / "list.txt"
    listing.write_text("val/a.JPEG\tcat\n")
    with pytest.raises(SourceError, match="is a list file"):
        open_source(listing, labels=labels)
