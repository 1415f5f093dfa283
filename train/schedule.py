"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (supplement A: 0.12 -> 0.00012)."""
from __future__ import annotations

import math


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): the paper's rates are quoted for a global batch of 1,024."""
    return lr * global_batch / reference_batch


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak rate at `step` (0-based): ramps to 1 over warm-up, then cosine to `final_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
