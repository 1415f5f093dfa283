"""Which samples each rank sees in which step of an epoch: a pure function of (N, B, W, rank, seed, epoch).

Every sample exactly once per epoch over all ranks, and the same number of steps on every rank:
- the epoch order is a permutation of 0..N-1 drawn from (seed, epoch) (identity when shuffle=False);
- rank r of W takes a contiguous slice of it, q = N // W samples, plus one for the first N % W ranks;
- S = max(1, ceil(q / B)) steps on every rank: S-1 batches of B, then one batch with the rest
  (1..B+1 samples), so no rank runs out early and no batch is empty.
"""

import math

import numpy as np
import torch

from pipelines.rng import PURPOSE_PERMUTATION, generator_for


def _check(num_samples: int, batch_size: int, world_size: int, rank: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_samples < world_size:
        raise ValueError(
            f"the dataset has {num_samples} samples, fewer than world_size={world_size}: "
            "some ranks would get no data"
        )


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """S, identical on every rank."""
    _check(num_samples, batch_size, world_size, 0)
    return max(1, math.ceil((num_samples // world_size) / batch_size))


def rank_slice(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share of the epoch order."""
    _check(num_samples, 1, world_size, rank)
    q, extra = divmod(num_samples, world_size)
    start = rank * q + min(rank, extra)
    return start, start + q + (1 if rank < extra else 0)


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """(N,) int64: the global sample order of one epoch, the same on every rank."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    generator = generator_for(PURPOSE_PERMUTATION, seed, epoch)
    return torch.randperm(num_samples, generator=generator).numpy()


def epoch_batches(
    num_samples: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    start_step: int = 0,
) -> list[np.ndarray]:
    """Rank's batches of global sample indexes for one epoch, from start_step on (exact resume)."""
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}] (steps per epoch), got {start_step}")
    start, stop = rank_slice(num_samples, world_size, rank)
    mine = epoch_order(num_samples, seed=seed, epoch=epoch, shuffle=shuffle)[start:stop]
    # Cut points of S-1 full batches; the last batch takes the rest (1..B+1 samples).
    bounds = [k * batch_size for k in range(steps)] + [len(mine)]
    return [mine[bounds[k]:bounds[k + 1]] for k in range(start_step, steps)]
