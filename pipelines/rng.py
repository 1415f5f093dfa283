"""Seeds derived from (purpose, seed, epoch, ...) so that randomness never depends on rank or worker count."""

import numpy as np
import torch

# First word of every derived seed: keeps the streams of different purposes apart. SeedSequence pads short
# entropy with zeros, so (seed, epoch) and (seed, epoch, 0) would otherwise collide.
PURPOSE_PERMUTATION = 1
PURPOSE_SAMPLE = 2
PURPOSE_LOADER = 3  # the DataLoader's own generator (worker base seeds; unused by our transforms)


def derive_seed(purpose: int, *words: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy's SeedSequence hashing)."""
    if any(w < 0 for w in words):
        raise ValueError(f"seed words must be non-negative, got {words}")
    state = np.random.SeedSequence([purpose, *words]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # torch.Generator.manual_seed takes values below 2**63 without wrapping


def generator_for(purpose: int, *words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(purpose, *words))
