"""Which samples each rank sees in which step of an epoch: a pure function of (N, B, W, rank, seed, epoch).

Every sample exactly once per epoch over all ranks, and the same number of steps on every rank:
- the epoch order is a permutation of 0..N-1 drawn from (seed, epoch) (identity when shuffle=False);
- S = max(1, ceil((N // W) / B)) steps on every rank;
- step s < S-1 reads the s-th window of W*B samples of the order, rank r its r-th B of them; the last step
  splits the rest (W..W*(B+1)-1 samples) over the ranks as evenly as possible (1..B+1 each, the first ranks
  taking one more), so no rank runs out early and no batch is empty.
Why windows and not a contiguous slice per rank: the global batch of step s (all ranks together) is then the
same for every W with the same W*B. 2 processes x batch B see, step by step, exactly the samples of
1 process x batch 2B, which is what lets a multi-process run reproduce a single-process one.
"""

import math

import numpy as np
import torch

from pirl_trainer.common.rng import PURPOSE_PERMUTATION, generator_for


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


def rank_sample_count(num_samples: int, batch_size: int, world_size: int, rank: int) -> int:
    """How many samples rank reads per epoch: (S-1)*B plus its share of the last step."""
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    _check(num_samples, batch_size, world_size, rank)
    rest = num_samples - (steps - 1) * world_size * batch_size
    return (steps - 1) * batch_size + rest // world_size + (1 if rank < rest % world_size else 0)


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
    _check(num_samples, batch_size, world_size, rank)
    order = epoch_order(num_samples, seed=seed, epoch=epoch, shuffle=shuffle)
    window = world_size * batch_size
    last = steps - 1
    rest = order[last * window:]
    base, extra = divmod(len(rest), world_size)
    lo = rank * base + min(rank, extra)
    last_batch = rest[lo:lo + base + (1 if rank < extra else 0)]
    return [order[k * window + rank * batch_size:k * window + (rank + 1) * batch_size] if k < last else last_batch
            for k in range(start_step, steps)]
