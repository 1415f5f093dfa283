import os

import pytest

from pirl_trainer.tools.sharding.sources import Entry, FolderSource, ListSource, open_source


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
        Entry(str(tmp_path / "a" / "1.jpg"), 0),
        Entry(str(tmp_path / "b_empty"), skip_reason="empty class folder"),
        Entry(str(tmp_path / "c" / "1.jpg"), 2),
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
        Entry(str(tmp_path / "b" / "2.jpg"), 1),
    ]


def test_list_resolves_relative_paths_against_the_list_folder(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "train.txt"
    listing.write_text("img/a.jpg\t3\n\n/abs/b.jpg\t0\r\n   \nc.jpg\t12\n")
    source = open_source(listing)
    assert isinstance(source, ListSource) and source.labelled and source.classes is None
    assert list(source) == [
        Entry(str(lists / "img" / "a.jpg"), 3),
        Entry("/abs/b.jpg", 0),
        Entry(str(lists / "c.jpg"), 12),
    ]


def test_unlabelled_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nb c.jpg\n")
    source = ListSource(listing)
    assert not source.labelled
    assert list(source) == [Entry(str(tmp_path / "a.jpg")), Entry(str(tmp_path / "b c.jpg"))]


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
