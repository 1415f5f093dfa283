"""Atomic checkpoints that hold everything a restart needs, loaded with `weights_only=True`.

A checkpoint holds plain containers of tensors and numbers only (no pickled objects), so loading it never runs
code from the file. The memory bank is saved whole, which keeps checkpoints independent of the process count.

A pretraining run's checkpoint (train/pirl.py): training_state() builds it from the run's TrainingParts,
save_training_state() writes it from every rank together, and a resumed run checks it (load_resume_state,
check_resume_data, check_resume_run) before restore_training_state() puts it back.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: importing accelerate costs seconds, and readers of checkpoints need none
    from accelerate import Accelerator

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


TRUNK_PREFIX = "trunk."  # the trunk of PIRLNet, CovariantNet, SimCLRNet and MoCoNet: every checkpoint names it alike


def trunk_weights(state: Any, source: str | Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(the arch its config names, or None; torchvision key -> tensor) of a loaded train/pirl.py checkpoint of any
    method: what the probes, fine-tuning and the export read. ValueError naming `source` when it holds no trunk."""
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{source}: not a train/pirl.py checkpoint (no 'model' state_dict)")
    weights = {k[len(TRUNK_PREFIX):]: v for k, v in model.items() if k.startswith(TRUNK_PREFIX)}
    if not weights:
        raise ValueError(f"{source} holds no trunk weights (no '{TRUNK_PREFIX}*' keys in its 'model' state_dict): "
                         "not a checkpoint of train/pirl.py?")
    config = state.get("config")
    model_config = config.get("model") if isinstance(config, dict) else None
    arch = model_config.get("arch") if isinstance(model_config, dict) else None
    return arch, weights


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


@dataclass
class TrainingParts:
    """What a pretraining run trains and its checkpoint holds besides numbers: the network (as built, not
    DDP-wrapped), its optimiser and learning-rate schedule, the memory bank (pirl, npid) and MoCo's key encoder
    and queue (model/moco.py); None for what the method has not."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    bank: Any | None = None
    momentum_keys: torch.nn.Module | None = None


@dataclass(frozen=True)
class RunShape:
    """The facts of a run a checkpoint records beside its step, which a resumed run is checked against."""

    steps_per_epoch: int
    world_size: int  # processes
    global_batch: int  # samples per step over all processes
    num_samples: int  # the training shards' samples: the bank's rows
    epoch_samples: int  # the subset's size, where data.subset* set one; else num_samples


def training_state(parts: TrainingParts, bank_state: dict | None, log_z: torch.Tensor, step: int, shape: RunShape,
                   config: dict) -> dict[str, Any]:
    """The checkpoint after global step `step`. bank_state: the bank's state_dict (gathered by every rank: a
    collective for a sharded bank), None without a bank; log_z: the binary NCE constant (NaN until estimated);
    config: the resolved config as a dict."""
    return {
        "model": parts.net.state_dict(),
        "bank": bank_state,
        "moco": parts.momentum_keys.state_dict() if parts.momentum_keys is not None else None,  # the same on every rank
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "log_z": log_z.cpu(),
        "step": step,
        "epoch": step // shape.steps_per_epoch,
        "step_in_epoch": step % shape.steps_per_epoch,
        "world_size": shape.world_size,
        "global_batch": shape.global_batch,
        "num_samples": shape.num_samples,
        "epoch_samples": shape.epoch_samples,
        "rng": rng_state(),
        "config": config,
    }


def save_training_state(accelerator: Accelerator, out_dir: Path, step: int, parts: TrainingParts,
                        log_z: torch.Tensor, shape: RunShape, config: dict) -> None:
    """Every rank calls it; the main process writes checkpoint_path(out_dir, step) (save_atomic)."""
    accelerator.wait_for_everyone()
    # collective for a sharded bank: every rank calls it, rank 0 gets the rows
    bank_state = parts.bank.state_dict() if parts.bank is not None else None
    if accelerator.is_main_process:
        save_atomic(training_state(parts, bank_state, log_z, step, shape, config), checkpoint_path(out_dir, step))


def load_resume_state(resume: str, out_dir: Path) -> tuple[Path, dict]:
    """--resume's checkpoint (a path, or "latest": the newest in out_dir) and its loaded state."""
    path = latest_checkpoint(out_dir) if resume == "latest" else Path(resume)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / CHECKPOINT_DIR}")
    return path, load(path)


def check_resume_data(accelerator: Accelerator, path: Path, state: dict, shards: str, num_samples: int,
                      batch_size: int, batch_key: str = "data.batch_size") -> None:
    """A checkpoint of a run on another number of samples is refused; one of another global batch continues,
    with a warning (steps then count in the new batches). batch_size: this run's per process, set by `batch_key`."""
    if state["num_samples"] != num_samples:
        raise ValueError(f"{path} was trained on {state['num_samples']} samples, {shards} holds {num_samples}")
    saved_batch = state.get("global_batch", state["world_size"] * batch_size)
    global_batch = batch_size * accelerator.num_processes
    if saved_batch != global_batch:
        accelerator.print(
            f"warning: {path} was trained with a global batch of {saved_batch} ({state['world_size']} "
            f"processes), this run has {global_batch}: steps, epochs and the learning-rate schedule now count "
            f"in batches of {global_batch}; keep world_size x {batch_key} to continue the same run"
        )


def check_resume_run(path: Path, state: dict, method: str, epoch_samples: int) -> None:
    """A pretraining checkpoint of another method, or of epochs over another subset, is refused."""
    trained = state["config"].get("method", "pirl")
    if trained != method:
        raise ValueError(f"{path} was trained with method={trained}, this run has method={method}")
    if state.get("epoch_samples", state["num_samples"]) != epoch_samples:
        raise ValueError(f"{path} was trained on epochs of {state.get('epoch_samples', state['num_samples'])} "
                         f"samples, this run's data.subset / data.subset_fraction give {epoch_samples}")


def restore_training_state(state: dict, parts: TrainingParts) -> tuple[int, torch.Tensor]:
    """Load a checkpoint's weights, bank, key encoder, optimiser, schedule and RNG states into `parts` and the
    global RNGs (call it before the network is DDP-wrapped); returns (its global step, its log_z)."""
    parts.net.load_state_dict(state["model"])
    if parts.bank is not None:
        parts.bank.load_state_dict(state["bank"])
    if parts.momentum_keys is not None:
        parts.momentum_keys.load_state_dict(state["moco"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return state["step"], state["log_z"]
