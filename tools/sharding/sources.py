"""Input sources for make_shards: an ImageFolder-style tree or a text list of image paths.

Both stream their entries in a fixed order (same input, same order, hence the same sample indexes) and never
list more than one class folder at a time. Problems found while listing (an empty class folder, a bad list line)
come out as entries that carry a skip reason, in input order with the others.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    path: str
    label: int | None = None
    skip_reason: str | None = None  # set when the source itself rejects the entry


class FolderSource:
    """root/<class>/<images>: class index = sorted class-folder order, file order within a class as
    torchvision's ImageFolder (sorted os.walk, then sorted names), including files in nested folders.

    Unlike ImageFolder, files are not filtered by extension: each file's content decides, and files that are not
    images are reported as skipped instead of silently ignored.
    """

    kind = "folder"
    labelled = True

    def __init__(self, root: Path):
        self.root = root
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
        self.classes = [e.name for e in entries if e.is_dir()]
        self._stray = [e.path for e in entries if not e.is_dir()]

    def __iter__(self) -> Iterator[Entry]:
        for path in self._stray:
            yield Entry(path, skip_reason="not in a class folder")
        for label, name in enumerate(self.classes):
            yield from self._class_entries(os.path.join(self.root, name), label)

    def _class_entries(self, class_dir: str, label: int) -> Iterator[Entry]:
        errors: list[OSError] = []
        found = False
        for folder, _, names in sorted(os.walk(class_dir, onerror=errors.append, followlinks=True)):
            for name in sorted(names):
                found = True
                yield Entry(os.path.join(folder, name), label)
        for e in errors:
            yield Entry(e.filename or class_dir, skip_reason=f"unreadable: folder: {type(e).__name__}: {e.strerror}")
        if not found and not errors:
            yield Entry(class_dir, skip_reason="empty class folder")


_LABEL = re.compile(r"[0-9]+")
# The manifest names every class index up to the largest label; 2**20 classes (~50x ImageNet-21k's 21,841)
# keeps that list to a few MB, and a label this large is far more likely a wrong column than a class.
MAX_LABEL = 2**20 - 1


class ListSource:
    """A text file, one image path per line, optionally followed by a TAB and an integer label 0..MAX_LABEL.

    Relative paths are resolved against the list file's folder. The first non-blank line decides whether the list
    is labelled; a later line that disagrees is skipped with a reason. Blank lines are ignored. The file is read
    line by line, never whole.
    """

    kind = "list"
    classes = None  # labels are plain integers; the builder derives the class count from the largest label

    def __init__(self, list_file: Path):
        self.list_file = list_file
        self.base = os.path.dirname(os.path.abspath(list_file))
        self.labelled = False
        with self._open() as f:
            for line in f:
                if line.strip():
                    self.labelled = "\t" in line
                    break

    def _open(self):
        # surrogateescape: paths that are not valid UTF-8 still round-trip to the file system
        return open(self.list_file, encoding="utf-8", errors="surrogateescape", newline=None)

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
            return Entry(path)
        label = fields[1].strip()
        if not _LABEL.fullmatch(label):
            return Entry(path, skip_reason=f"bad list line: {where}: label {label!r} is not a non-negative integer")
        if int(label) > MAX_LABEL:
            return Entry(path, skip_reason=f"bad list line: {where}: label {label} > {MAX_LABEL}")
        return Entry(path, int(label))


def open_source(src: Path) -> FolderSource | ListSource:
    if src.is_dir():
        return FolderSource(src)
    if src.is_file():
        return ListSource(src)
    raise FileNotFoundError(f"--input {src}: no such folder or list file")
