"""Input sources for make_shards: an ImageFolder-style tree, a flat folder with a labels file, or a text list.

All stream their entries in a fixed order (same input, same order, hence the same sample indexes). Problems found
while listing (an empty class folder, a bad list line) come out as entries that carry a skip reason, in input
order with the others. Problems that would give samples the wrong class (a class name outside the given class
index, a labels file that does not match its folder) are SourceErrors raised when the source is opened, before
anything is written.

A class index is the list of class names in label order: label i is the class named classes[i]. Two shard sets
share one only when their manifests' `classes` are equal; `--classes` (ClassIndex) makes a second set use the
first one's.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pirl_trainer.pipelines.shard_format import MANIFEST_NAME, read_manifest


class SourceError(ValueError):
    """An input whose labels cannot be trusted; raised before any output exists."""


@dataclass(frozen=True)
class Entry:
    path: str
    label: int | None = None
    skip_reason: str | None = None  # set when the source itself rejects the entry
    # what the sample is called in its input: the path relative to the input folder, or the list file's entry
    # (OUT/sample_names.txt, which data.subset matches image names against)
    name: str | None = None


@dataclass(frozen=True)
class ClassIndex:
    """Class names in label order, and where they were read (named in errors and in the manifest)."""

    names: tuple[str, ...]
    origin: str

    def __post_init__(self):
        if not self.names:
            raise SourceError(f"--classes {self.origin}: no class names")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if name in seen:
                raise SourceError(f"--classes {self.origin}: class {name!r} appears twice (positions {seen[name]} "
                                  f"and {i})")
            seen[name] = i

    def positions(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def read_class_index(path: str | os.PathLike) -> ClassIndex:
    """The class index of a shard folder of make_shards (its manifest.json `classes`; the manifest file itself
    also works), or of a text file with one class name a line (the whole line less surrounding blanks, so names
    may hold spaces; blank lines are ignored)."""
    path = Path(path)
    if path.is_dir() or path.name == MANIFEST_NAME:
        manifest = read_manifest(path)
        if not manifest["labelled"] or not manifest["classes"]:
            raise SourceError(f"--classes {path}: the shards are unlabelled, they have no class index")
        return ClassIndex(tuple(manifest["classes"]), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"--classes {path}: no such shard folder or file of class names")
    with open(path, encoding="utf-8-sig") as f:
        names = tuple(line.strip() for line in f if line.strip())
    return ClassIndex(names, str(path))


class FolderSource:
    """root/<class>/<images>: class index = sorted class-folder order, file order within a class as
    torchvision's ImageFolder (sorted os.walk, then sorted names), including files in nested folders.

    With a given ClassIndex, each folder's label is its name's position in that index (a split may lack some
    classes: its manifest still lists the whole index), folders are read in index order, and a folder whose name
    is not in the index is a SourceError.

    Unlike ImageFolder, files are not filtered by extension: each file's content decides, and files that are not
    images are reported as skipped instead of silently ignored.
    """

    kind = "folder"
    labelled = True

    def __init__(self, root: Path, classes: ClassIndex | None = None):
        self.root = root
        self.input_root = root
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
        folders = [e.name for e in entries if e.is_dir()]
        self._stray = [e.path for e in entries if not e.is_dir()]
        self.class_index = classes
        if classes is None:
            self.classes = folders
            self._folders = list(enumerate(folders))
            return
        positions = classes.positions()
        unknown = [name for name in folders if name not in positions]
        if unknown:
            raise SourceError(f"--input {root}: class folder {unknown[0]!r} is not a class of --classes "
                              f"{classes.origin} ({len(unknown)} such folder(s) of {len(folders)})")
        self.classes = list(classes.names)
        self._folders = sorted((positions[name], name) for name in folders)

    @property
    def description(self) -> dict:
        return _description(self.kind, self.root, classes=self.class_index)

    def __iter__(self) -> Iterator[Entry]:
        for path in self._stray:
            yield Entry(path, skip_reason="not in a class folder")
        for label, name in self._folders:
            yield from self._class_entries(os.path.join(self.root, name), label)

    def _class_entries(self, class_dir: str, label: int) -> Iterator[Entry]:
        errors: list[OSError] = []
        found = False
        for folder, _, names in sorted(os.walk(class_dir, onerror=errors.append, followlinks=True)):
            for name in sorted(names):
                found = True
                path = os.path.join(folder, name)
                yield Entry(path, label, name=os.path.relpath(path, self.root))
        for e in errors:
            yield Entry(e.filename or class_dir, skip_reason=f"unreadable: folder: {type(e).__name__}: {e.strerror}")
        if not found and not errors:
            yield Entry(class_dir, skip_reason="empty class folder")


_LABEL = re.compile(r"[0-9]+")
# The manifest names every class index up to the largest label; 2**20 classes (~50x ImageNet-21k's 21,841)
# keeps that list to a few MB, and a label this large is far more likely a wrong column than a class.
MAX_LABEL = 2**20 - 1


class ListSource:
    """A text file, one image path per line, optionally followed by a TAB and a label: a class number
    0..MAX_LABEL or a class name.

    Relative paths are resolved against the list file's folder. The first non-blank line decides whether the list
    is labelled, and, without a ClassIndex, whether its labels are numbers (class i is named "i", the builder
    counts up to the largest) or names (class index = the sorted set of names, as ImageFolder sorts its folders;
    the list is read once more first to collect them). A later line that disagrees is skipped with a reason.
    With a ClassIndex every label is a name looked up in it, and a name not in it is a SourceError. Blank lines
    are ignored. The file is read line by line, never whole.
    """

    kind = "list"
    input_root = None

    def __init__(self, list_file: Path, classes: ClassIndex | None = None):
        self.list_file = list_file
        self.base = os.path.dirname(os.path.abspath(list_file))
        self.labelled = False
        self.class_index = classes
        self.classes: list[str] | None = None  # None for numbered labels: the builder derives the class count
        self._positions: dict[str, int] | None = None
        first_label = None
        with self._open() as f:
            for line in f:
                if line.strip():
                    self.labelled = "\t" in line
                    first_label = line.rstrip("\n").split("\t")[1].strip() if self.labelled else None
                    break
        if classes is not None and not self.labelled:
            raise SourceError(f"--classes {classes.origin}: the list {list_file} has no labels to look up in it")
        if not self.labelled or (classes is None and _LABEL.fullmatch(first_label)):
            return
        if classes is None:
            self.classes = sorted(set(self._names()))
            if not self.classes:
                raise SourceError(f"{list_file}: labelled (a TAB on its first line) but no line names a class")
            self._positions = {name: i for i, name in enumerate(self.classes)}
            return
        self._positions = classes.positions()
        self.classes = list(classes.names)
        unknown = [(number, name) for number, name in self._numbered_names() if name not in self._positions]
        if unknown:
            number, name = unknown[0]
            raise SourceError(f"{self.list_file}:{number}: class {name!r} is not a class of --classes "
                              f"{classes.origin} ({len(unknown)} line(s) name a class outside it)")

    @property
    def description(self) -> dict:
        return _description(self.kind, self.list_file, classes=self.class_index)

    def _open(self):
        # surrogateescape: paths that are not valid UTF-8 still round-trip to the file system
        return open(self.list_file, encoding="utf-8", errors="surrogateescape", newline=None)

    def _numbered_names(self) -> Iterator[tuple[int, str]]:
        """(line number, label) of every line that _parse would accept as labelled."""
        with self._open() as f:
            for number, line in enumerate(f, start=1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) == 2 and fields[1].strip():
                    yield number, fields[1].strip()

    def _names(self) -> Iterator[str]:
        return (name for _, name in self._numbered_names())

    def __iter__(self) -> Iterator[Entry]:
        with self._open() as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if line.strip():
                    yield self._parse(number, line)

    def _parse(self, number: int, line: str) -> Entry:
        fields = line.split("\t")
        path = os.path.join(self.base, fields[0])
        where = f"{self.list_file}:{number}"
        if len(fields) > 2:
            return Entry(path, skip_reason=f"bad list line: {where}: {len(fields)} TAB-separated fields, not 1 or 2")
        if (len(fields) == 2) != self.labelled:
            expected = "a label" if self.labelled else "no label"
            reason = f"bad list line: {where}: the list's first line has {expected}, this one differs"
            return Entry(path, skip_reason=reason)
        if len(fields) == 1:
            return Entry(path, name=fields[0])
        label = fields[1].strip()
        if self._positions is not None:
            if not label:
                return Entry(path, skip_reason=f"bad list line: {where}: empty class name")
            return Entry(path, self._positions[label], name=fields[0])
        if not _LABEL.fullmatch(label):
            return Entry(path, skip_reason=f"bad list line: {where}: label {label!r} is not a non-negative integer "
                                           "(the list's first label is a class number)")
        if int(label) > MAX_LABEL:
            return Entry(path, skip_reason=f"bad list line: {where}: label {label} > {MAX_LABEL}")
        return Entry(path, int(label), name=fields[0])


KAGGLE_HEADER = ("ImageId", "PredictionString")


def read_labels(labels_file: Path) -> dict[str, tuple[str, int]]:
    """{image id: (class name, line number)} from Kaggle's LOC_*_solution.csv (header "ImageId,PredictionString";
    the prediction string's first token is the class, the rest boxes) or from lines "file<TAB>class name".
    Any malformed line, or an image listed twice, is a SourceError naming the line: a labels file is all or nothing.
    """
    with open(labels_file, encoding="utf-8-sig", newline="") as f:
        first = next((line for line in f if line.strip()), "")
    if "\t" in first:
        return _read_tab_labels(labels_file)
    if tuple(field.strip() for field in first.split(",")[:2]) == KAGGLE_HEADER:
        return _read_kaggle_labels(labels_file)
    raise SourceError(f"--labels {labels_file}: neither Kaggle's CSV (first line 'ImageId,PredictionString') nor "
                      f"'file<TAB>class' lines; its first line is {first.rstrip()[:80]!r}")


def _add_label(labels: dict, labels_file: Path, number: int, image_id: str, name: str) -> None:
    if not image_id or not name:
        what = "image id" if not image_id else "class"
        raise SourceError(f"{labels_file}:{number}: no {what}")
    if image_id in labels:
        raise SourceError(f"{labels_file}:{number}: {image_id!r} is listed again (first on line "
                          f"{labels[image_id][1]})")
    labels[image_id] = (name, number)


def _read_kaggle_labels(labels_file: Path) -> dict[str, tuple[str, int]]:
    labels: dict[str, tuple[str, int]] = {}
    with open(labels_file, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        next(rows)  # the header
        for row in rows:
            if not any(field.strip() for field in row):
                continue
            if len(row) != 2:
                raise SourceError(f"{labels_file}:{rows.line_num}: {len(row)} comma-separated fields, expected 2 "
                                  f"({','.join(KAGGLE_HEADER)})")
            tokens = row[1].split()
            _add_label(labels, labels_file, rows.line_num, row[0].strip(), tokens[0] if tokens else "")
    return labels


def _read_tab_labels(labels_file: Path) -> dict[str, tuple[str, int]]:
    labels: dict[str, tuple[str, int]] = {}
    with open(labels_file, encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise SourceError(f"{labels_file}:{number}: {len(fields)} TAB-separated fields, expected "
                                  "'file<TAB>class'")
            _add_label(labels, labels_file, number, fields[0].strip(), fields[1].strip())
    return labels


class LabelledFolderSource:
    """A flat folder of images and a labels file naming each image's class (ImageNet's validation set:
    ILSVRC2012_val_00000001.JPEG ... with Kaggle's LOC_val_solution.csv).

    A labels entry names a file by its name or by its stem (the name less its extension, as Kaggle's ImageId).
    Files are read in sorted name order, whatever the order of the labels file. The labels and the folder must
    match exactly, each of these being a SourceError that names the first culprit: a listed image without a
    file, a file that no line labels (an evaluation set is the listed images, all of them: a stray file means a
    wrong folder or labels file), a subfolder, a stem shared by two files, a class not in the ClassIndex.
    Class index: the ClassIndex, or else the sorted set of the labels' class names (ImageFolder's order).
    """

    kind = "labelled-folder"
    labelled = True

    def __init__(self, root: Path, labels_file: Path, classes: ClassIndex | None = None):
        self.root = self.input_root = root
        self.labels_file = labels_file
        self.class_index = classes
        if not labels_file.is_file():
            raise FileNotFoundError(f"--labels {labels_file}: no such file")
        labels = read_labels(labels_file)
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
        folders = [e.name for e in entries if e.is_dir()]
        if folders:
            raise SourceError(f"--input {root}: {folders[0]!r} is a folder; --labels takes a flat folder of images "
                              "(class folders need no labels file)")
        files = [e.name for e in entries]
        stems: dict[str, list[str]] = {}
        for name in files:
            stems.setdefault(os.path.splitext(name)[0], []).append(name)
        names = set(files)
        matched: dict[str, tuple[str, str, int]] = {}  # file name -> (class, image id, line)
        missing = []
        for image_id, (cls, number) in labels.items():
            found = [image_id] if image_id in names else stems.get(image_id, [])
            if len(found) > 1:
                raise SourceError(f"{labels_file}:{number}: {image_id!r} matches {len(found)} files in {root}: "
                                  f"{found[0]!r} and {found[1]!r}")
            if not found:
                missing.append((number, image_id))
                continue
            if found[0] in matched:
                raise SourceError(f"{labels_file}:{number}: {image_id!r} and line {matched[found[0]][2]} "
                                  f"({matched[found[0]][1]!r}) both label {os.path.join(root, found[0])}")
            matched[found[0]] = (cls, image_id, number)
        if missing:
            number, image_id = min(missing)
            raise SourceError(f"{labels_file}:{number}: listed image {image_id!r} has no file in {root} "
                              f"({len(missing)} of {len(labels)} listed images missing)")
        unlisted = [name for name in files if name not in matched]
        if unlisted:
            raise SourceError(f"--input {root}: {os.path.join(root, unlisted[0])} is not in --labels {labels_file} "
                              f"({len(unlisted)} unlisted file(s)); remove them from the folder, or label them")
        if classes is None:
            self.classes = sorted({cls for cls, _, _ in matched.values()})
            positions = {name: i for i, name in enumerate(self.classes)}
        else:
            positions = classes.positions()
            self.classes = list(classes.names)
            unknown = sorted((number, cls) for cls, _, number in matched.values() if cls not in positions)
            if unknown:
                number, cls = unknown[0]
                raise SourceError(f"{labels_file}:{number}: class {cls!r} is not a class of --classes "
                                  f"{classes.origin} ({len(unknown)} line(s) name a class outside it)")
        self._entries = [(os.path.join(root, name), positions[matched[name][0]]) for name in files]

    @property
    def description(self) -> dict:
        return _description(self.kind, self.root, labels=self.labels_file, classes=self.class_index)

    def __iter__(self) -> Iterator[Entry]:
        for path, label in self._entries:
            yield Entry(path, label, name=os.path.basename(path))


def _description(kind: str, path: Path, *, labels: Path | None = None, classes: ClassIndex | None = None) -> dict:
    """The manifest's `source`: what was read, so that the shards can be made again."""
    out = {"kind": kind, "path": str(Path(path).resolve())}
    if labels is not None:
        out["labels"] = str(Path(labels).resolve())
    if classes is not None:
        out["classes"] = str(Path(classes.origin).resolve())
    return out


Source = FolderSource | ListSource | LabelledFolderSource


def open_source(src: Path, labels: str | os.PathLike | None = None,
                classes: str | os.PathLike | ClassIndex | None = None) -> Source:
    """The source for --input SRC [--labels FILE] [--classes SHARDS|NAMES]; errors are raised here, before any
    output is made."""
    src = Path(src)
    index = classes if classes is None or isinstance(classes, ClassIndex) else read_class_index(classes)
    if labels is not None:
        if src.is_file():
            raise SourceError(f"--labels labels a flat folder of images, and --input {src} is a list file: put each "
                              "image's class in the list instead (path<TAB>class)")
        if not src.is_dir():
            raise FileNotFoundError(f"--input {src}: no such folder")
        return LabelledFolderSource(src, Path(labels), index)
    if src.is_dir():
        return FolderSource(src, index)
    if src.is_file():
        return ListSource(src, index)
    raise FileNotFoundError(f"--input {src}: no such folder or list file")
