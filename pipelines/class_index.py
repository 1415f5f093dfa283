"""One check that two labelled shard sets share a class index, for every evaluation that trains on one and scores on
the other (train/linear_probe.py, train/knn_monitor.py, method=supervised with the kNN monitor).

A label is a position in the manifest's `classes`; two sets made apart (tools/make_shards.py on ImageNet's class
folders, then on its flat validation folder) agree only if their lists are equal. With different lists every score
compares different classes and still looks like a number, so the sets are refused instead.
"""
from __future__ import annotations

import os
from pathlib import Path

from pirl_trainer.pipelines.shard_format import MANIFEST_NAME, read_manifest


class ClassIndexMismatch(ValueError):
    """Training and test shards whose `classes` differ."""


def manifest_classes(shards: str | os.PathLike) -> list[str] | None:
    """The `classes` of a shard folder's manifest (or of the folder of a .beton file given directly); None when the
    shards are unlabelled or a .beton has no manifest beside it (its loader numbers the classes itself)."""
    path = Path(shards)
    folder = path.parent if path.is_file() else path
    if path.is_file() and not (folder / MANIFEST_NAME).is_file():
        return None
    manifest = read_manifest(folder)
    return list(manifest["classes"]) if manifest["labelled"] else None


def class_difference(train: list[str], test: list[str]) -> str | None:
    """None for equal lists, else the first difference in words: a position and both names, or both counts."""
    for position, (a, b) in enumerate(zip(train, test)):
        if a != b:
            return (f"class {position} is {a!r} in the training shards and {b!r} in the test shards "
                    f"({len(train)} and {len(test)} classes)")
    if len(train) != len(test):
        shared = min(len(train), len(test))
        return f"the training shards have {len(train)} classes, the test shards {len(test)} (the first {shared} agree)"
    return None


def check_same_classes(user: str, train_shards: str | os.PathLike, train_classes: list[str] | None,
                       test_shards: str | os.PathLike, test_classes: list[str] | None) -> None:
    """ClassIndexMismatch naming both folders and the first difference when both sets are labelled and their class
    lists differ. An unlabelled side (None) passes: each user refuses unlabelled shards in its own words."""
    if train_classes is None or test_classes is None:
        return
    difference = class_difference(list(train_classes), list(test_classes))
    if difference is not None:
        raise ClassIndexMismatch(
            f"{user}: training shards {train_shards} and test shards {test_shards} have different class indexes: "
            f"{difference}. Labels are positions in these lists, so the test labels would name other classes; make "
            f"the test shards with the training shards' index: tools/make_shards.py --input ... --classes "
            f"{train_shards} --output ...")
