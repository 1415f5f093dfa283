"""A labelled subset of the training shards (semi-supervised fine-tuning): the global sample indexes an epoch covers.

Three ways to name it (train/pirl.py's data.subset, data.subset_fraction, data.subset_seed):
- a text file of sample indexes, one a line (a file whose every non-blank line is an integer);
- a text file of image names, one a line: ImageNet's 1 % and 10 % files as published with SimCLR
  (`n01440764_10026.JPEG`, ...). They are looked up in the shards' sample-names file (tools/make_shards.py writes
  it: line i = sample i's path relative to the input folder, or its list entry): a line without '/' by file name,
  a line with one by as many trailing path components as it has (`n01440764/n01440764_10026.JPEG`). A name that
  matches no sample, or several, is an error, as is a sample named twice;
- a fraction of each class's samples: round(fraction x the class's count), at least one, the samples with the
  smallest counter-based draws of (seed, global index). The same seed gives the same subset on every rank and run,
  and a smaller fraction's subset lies inside a larger one's.
The loader then shuffles and splits only the subset (pipelines/epoch_loader.py, EpochLoader.set_subset); the global
index, hence the label lookup and any bank row, stays the sample's own.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from pirl_trainer.common.rng import PURPOSE_SUBSET, counter_uniform, derive_seed
from pirl_trainer.pipelines.shard_format import MANIFEST_NAME, read_manifest, sample_names_file

SHOWN = 5  # names quoted in an error about several of them
_INTEGER = re.compile(r"[0-9]+")


class SubsetError(ValueError):
    """A subset that cannot be applied: a bad file, names not in the shards, a fraction out of range."""


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line, surrounding blanks removed."""
    path = Path(path)
    if not path.is_file():
        raise SubsetError(f"subset file {path}: no such file")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, start=1) if line.strip()]
    if not lines:
        raise SubsetError(f"subset file {path} names no sample")
    return lines


def sample_names(shard_dir: str | os.PathLike) -> list[str]:
    """Line i of the shards' sample-names file: sample i's source name. A SubsetError for shards made without one."""
    path = Path(shard_dir)
    folder = path.parent if path.is_file() else path
    manifest = read_manifest(folder)
    names_path = sample_names_file(folder, manifest)
    if names_path is None:
        raise SubsetError(f"{folder / MANIFEST_NAME} lists no sample names (shards made before tools/make_shards.py "
                          "wrote sample_names.txt): remake the shards, or give the subset as sample indexes")
    if not names_path.is_file():
        raise SubsetError(f"{names_path}: listed in {folder / MANIFEST_NAME} but missing")
    with open(names_path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        names = [line[:-1] if line.endswith("\n") else line for line in f]
    if len(names) != manifest["num_samples"]:
        raise SubsetError(f"{names_path}: {len(names)} lines for {manifest['num_samples']} samples: remake the shards")
    return names


def _where(path, number: int, text: str) -> str:
    return f"{path}:{number} ({text!r})"


def indexes_from_lines(path, lines: list[tuple[int, str]], num_samples: int) -> np.ndarray:
    """The integers of a subset file of sample indexes, each in [0, num_samples)."""
    indexes = np.array([int(text) for _, text in lines], dtype=np.int64)
    outside = np.flatnonzero(indexes >= num_samples)
    if len(outside):
        number, text = lines[outside[0]]
        raise SubsetError(f"{_where(path, number, text)}: sample index outside the shards' 0..{num_samples - 1} "
                          f"({len(outside)} such lines)")
    return indexes


def _suffix_table(names: list[str], parts: int) -> dict[str, int]:
    """{the last `parts` path components of a name: its sample}, -1 where several samples share them."""
    table: dict[str, int] = {}
    for i, name in enumerate(names):
        key = "/".join(name.split("/")[-parts:])
        table[key] = -1 if key in table else i
    return table


def indexes_from_names(path, lines: list[tuple[int, str]], names: list[str], names_origin: str) -> np.ndarray:
    """The samples a subset file of image names means (module docstring: by file name, or trailing path)."""
    tables: dict[int, dict[str, int]] = {}
    indexes = np.empty(len(lines), dtype=np.int64)
    missing, ambiguous = [], []
    for row, (number, text) in enumerate(lines):
        key = text.strip("/")
        parts = key.count("/") + 1
        if parts not in tables:
            tables[parts] = _suffix_table(names, parts)
        indexes[row] = tables[parts].get(key, -2)
        if indexes[row] == -2:
            missing.append(text)
        elif indexes[row] == -1:
            ambiguous.append((number, text))
    if missing:
        raise SubsetError(f"subset file {path}: {len(missing)} of its {len(lines)} names are not in {names_origin}, "
                          f"e.g. {', '.join(map(repr, missing[:SHOWN]))}: are they images of these shards?")
    if ambiguous:
        number, text = ambiguous[0]
        shared = [name for name in names if name == text or name.endswith("/" + text.strip("/"))][:SHOWN]
        raise SubsetError(f"{_where(path, number, text)} names several samples ({', '.join(shared)}; "
                          f"{len(ambiguous)} such lines): give the folder too, e.g. {shared[0]!r}")
    return indexes


def subset_from_file(path: str | os.PathLike, shard_dir: str | os.PathLike, num_samples: int) -> np.ndarray:
    """Sorted global indexes of a subset file: sample indexes when every line is an integer, else image names."""
    lines = read_lines(path)
    if all(_INTEGER.fullmatch(text) for _, text in lines):
        indexes = indexes_from_lines(path, lines, num_samples)
    else:
        indexes = indexes_from_names(path, lines, sample_names(shard_dir), f"{shard_dir}'s sample names")
    order = np.argsort(indexes, kind="stable")
    twice = np.flatnonzero(np.diff(indexes[order]) == 0)
    if len(twice):
        first, again = lines[order[twice[0]]], lines[order[twice[0] + 1]]
        raise SubsetError(f"{_where(path, *again)} names sample {indexes[order[twice[0]]]} again (first on line "
                          f"{first[0]}; {len(twice)} repeated): each sample once")
    return indexes[order]


def class_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted global indexes of round(fraction x n_c), at least 1, samples of every class c (module docstring)."""
    if not 0.0 < fraction <= 1.0:
        raise SubsetError(f"subset fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    draw = counter_uniform(derive_seed(PURPOSE_SUBSET, seed), torch.arange(n), 1)[:, 0].numpy()  # (N,)
    order = np.lexsort((draw, labels))  # class by class, smallest draw first
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    take = np.maximum(1, np.floor(fraction * counts + 0.5)).astype(np.int64)  # round half up
    rank = np.arange(n) - np.repeat(starts, counts)  # position inside its class
    return np.sort(order[rank < np.repeat(take, counts)])


def describe(subset: np.ndarray, num_samples: int, subset_labels: np.ndarray | None,
             classes: list[str] | None) -> str:
    """'K of N samples' and, for labelled shards, the fewest and most samples of a class in the subset."""
    text = f"{len(subset)} of {num_samples} samples"
    if subset_labels is None or not classes:
        return text
    counts = np.bincount(subset_labels, minlength=len(classes))
    empty = int((counts == 0).sum())
    text += f", {counts.min()}-{counts.max()} per class (min-max over {len(classes)} classes"
    return text + (f"; {empty} without a sample)" if empty else ")")


def resolve_subset(loader, shard_dir: str | os.PathLike, *, path: str = "", fraction: float = 0.0,
                   seed: int = 0) -> tuple[np.ndarray | None, str]:
    """(sorted global indexes, a one-line description) of the subset a file or a per-class fraction names, or
    (None, "") for neither. `loader`: an EpochLoader of the shards (num_samples, labelled, classes,
    sample_labels)."""
    if path and fraction:
        raise SubsetError(f"a subset file ({path}) and a subset fraction ({fraction}) are both set: choose one")
    if not path and not fraction:
        return None, ""
    n = loader.num_samples
    labels = None
    if path:
        subset = subset_from_file(path, shard_dir, n)
    else:
        if not loader.labelled:
            raise SubsetError(f"a subset fraction is drawn class by class, and {shard_dir} is unlabelled")
        labels = loader.sample_labels(np.arange(n))
        subset = class_fraction(labels, fraction, seed)
    if loader.labelled:
        labels = labels[subset] if labels is not None else loader.sample_labels(subset)
    return subset, describe(subset, n, labels, loader.classes)
