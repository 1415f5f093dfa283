"""DALI's webdataset index format, written while the tar is written.

The format is the one of `wds2idx` shipped in the nvidia-dali wheel (IndexCreator.create_index, DALI 2.4):
a header line "v1.2 <number of samples>", then one line per sample listing each of its tar members as
"<ext> <data offset> <size> <member name>", all separated by single spaces, in tar order.
The data offset is the header's offset plus one 512-byte tar block.
"""

from __future__ import annotations

from collections.abc import Iterable

INDEX_VERSION = "v1.2"  # wds2idx.IndexCreator.index_file_version

# (extension, data offset in the tar, size in bytes, member name)
Component = tuple[str, int, int, str]


def sample_line(components: Iterable[Component]) -> str:
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def index_text(sample_lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(sample_lines)}\n" + "".join(line + "\n" for line in sample_lines)
