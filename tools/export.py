"""The trunk of a train/pirl.py checkpoint as a torchvision ResNet state_dict in safetensors format.

    python tools/export.py --checkpoint runs/pirl/checkpoints/step_000001000.pt --output trunk.safetensors

The file loads into torchvision with the classifier removed (the trunk's output is the pooled res5 feature v),
for the arch the checkpoint was trained with (its config's model.arch):

    m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
    m.load_state_dict(safetensors.torch.load_file("trunk.safetensors"), strict=True)

Heads f and g, the memory bank and the optimiser state stay behind. The header's metadata holds the arch, the
source checkpoint and its step: safetensors.safe_open(path, "pt").metadata(). A model.sync_bn checkpoint needs no
mapping: GlooSyncBatchNorm2d and nn.SyncBatchNorm keep nn.BatchNorm2d's state_dict keys.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch

from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.train import checkpoint


def trunk_tensors(state: dict, source: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(arch, torchvision key -> tensor) of a loaded checkpoint; every key and shape checked against the arch."""
    arch, weights = checkpoint.trunk_weights(state, source)
    if arch is None:
        raise ValueError(f"{source}: the checkpoint has no config.model.arch")
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            expected = build_trunk(arch)[0].state_dict()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: trunk keys do not match torchvision {arch}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        if weights[key].shape != ref.shape:
            raise ValueError(f"{source}: {checkpoint.TRUNK_PREFIX}{key} has shape {tuple(weights[key].shape)}, "
                             f"torchvision {arch} expects {tuple(ref.shape)}")
    # safetensors takes contiguous CPU tensors that share no storage: a channels_last run saves NHWC strides.
    return arch, {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in weights.items()}


def write_atomic(data: bytes, path: Path) -> None:
    """Temporary name in the same folder, fsync, rename: an interrupted export leaves no partial file at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, a quota, an interrupt: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def export(checkpoint_path: str | Path, output: str | Path) -> tuple[str, int]:
    """Write the trunk of checkpoint_path to output; returns (arch, number of tensors)."""
    source, output = Path(checkpoint_path), Path(output)
    if output.resolve() == source.resolve():
        raise ValueError(f"--output {output} is the checkpoint itself")
    state = checkpoint.load(source)
    arch, tensors = trunk_tensors(state, source)
    metadata = {"format": "pt", "arch": arch, "source_checkpoint": str(source.resolve()),
                "step": str(state.get("step", "unknown"))}
    write_atomic(safetensors.torch.save(tensors, metadata=metadata), output)
    return arch, len(tensors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a train/pirl.py checkpoint (.pt)")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        arch, count = export(args.checkpoint, args.output)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as err:  # each names the file
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {count} tensors ({arch} trunk of {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
