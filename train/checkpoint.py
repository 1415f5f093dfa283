"""Atomic checkpoints that hold everything a restart needs, loaded with `weights_only=True`.

A checkpoint holds plain containers of tensors and numbers only (no pickled objects), so loading it never runs
code from the file. The memory bank is saved whole, which keeps checkpoints independent of the process count.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:09d}.pt"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    return checkpoint_path(out_dir, steps[-1]) if steps else None


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:  # a full disk, a quota, an interrupt: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            previous = latest_checkpoint(path.parent.parent)
            kept = f"{previous} stays the latest" if previous else "no earlier checkpoint"
            raise OSError(exc.errno, f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}") from exc
        raise
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which file, not just the unpickler's complaint
        raise RuntimeError(f"cannot load checkpoint {path}: {exc}") from exc


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain lists (weights_only-safe). The step's own draws
    (patch orders, negatives) are counter-based on (seed, step, sample) and need no saved stream."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo rng_state(); a "generators" entry of older checkpoints (per-rank streams, now unused) is ignored."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
