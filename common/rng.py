"""Seeds derived from (purpose, seed, epoch, ...) so that randomness never depends on rank or worker count."""

import numpy as np
import torch

# First word of every derived seed: keeps the streams of different purposes apart. SeedSequence pads short
# entropy with zeros, so (seed, epoch) and (seed, epoch, 0) would otherwise collide.
PURPOSE_PERMUTATION = 1
PURPOSE_SAMPLE = 2
PURPOSE_LOADER = 3  # the DataLoader's own generator (worker base seeds; unused by our transforms)
PURPOSE_AUGMENT = 4  # the batched stage's photometric and rotation draws (pipelines/augment.py)
PURPOSE_HEADS = 5  # the jigsaw head's patch order, per (seed, step, global index) (train/pirl.py)
PURPOSE_JIGSAW_LABEL = 6  # the Jigsaw baseline's permutation id, per (seed, step, global index) (model/covariant.py)
PURPOSE_SUBSET = 7  # data.subset_fraction's per-class draw, per (subset seed, global index) (pipelines/subset.py)
PURPOSE_BLUR = 8  # the batched stage's Gaussian blur coins and sigmas, per (seed, epoch, index) (pipelines/blur.py)
PURPOSE_MOCO_SHUFFLE = 9  # MoCo's shuffled BatchNorm: the key images' order, per (seed, step, global index)
# The memory bank's counter draws (model/memory_bank.py).
PURPOSE_NEGATIVES = 16  # per-sample negatives, per (seed, step, global index)
PURPOSE_BANK_INIT = 17  # a sharded bank's initial rows, per (seed, row)
PURPOSE_SHARED_NEGATIVES = 18  # one draw per batch: apart from the per-sample stream (same counters)


def derive_seed(purpose: int, *words: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy's SeedSequence hashing)."""
    if any(w < 0 for w in words):
        raise ValueError(f"seed words must be non-negative, got {words}")
    state = np.random.SeedSequence([purpose, *words]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # torch.Generator.manual_seed takes values below 2**63 without wrapping


def generator_for(purpose: int, *words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(purpose, *words))


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash ("lowbias32", C. Wellons' hash-prospector): every output bit depends on
    every input bit with a measured bias of ~1.7e-4. Plain int64 tensor ops, so it gives the same bits on
    every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_words(key: int, index: torch.Tensor, num: int) -> torch.Tensor:
    """(B, num) int64 32-bit words: word j of sample index[b] is a hash of (key, index[b], j).

    counter_uniform without its check of negative indexes, whose `.any()` would make a GPU wait for the host:
    for hot paths whose indexes are non-negative by construction (sample indexes). Computed on index's device.
    """
    index = index.to(torch.int64)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    h = _mix32((index & _MASK32) ^ k0)
    h = _mix32(h ^ (index >> 32) ^ k1)  # index >> 32 is 0 below 4.3e9 samples; kept for larger sets
    slots = torch.arange(num, dtype=torch.int64, device=index.device)
    h = _mix32(h.unsqueeze(1) ^ slots)  # (B, num)
    return _mix32(h ^ k1)  # a second round after the slot, so neighbouring slots decorrelate fully


def counter_uniform(key: int, index: torch.Tensor, num: int) -> torch.Tensor:
    """(B, num) float64 uniforms in [0, 1): draw j of sample index[b] is a hash of (key, index[b], j).

    A counter-based generator: a draw depends on its (key, sample, slot) only, not on which other samples
    share the batch or on the device, so a whole batch's augmentation parameters come from a handful of
    tensor ops with no per-sample generator. `key` is a derive_seed() value (63 bits, both halves used).
    """
    index = index.to(torch.int64)
    if (index < 0).any():
        raise ValueError("counter_uniform: sample indexes must be non-negative")
    return counter_words(key, index, num).to(torch.float64) / 2.0**32
