"""Learning-rate schedules: linear warm-up, then cosine decay to a floor (supplement A: 0.12 -> 0.00012), or steps."""
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


def step_lr_factor(step: int, warmup_steps: int, drop_steps: list[int], gamma: float = 0.1) -> float:
    """Multiplier of the peak rate at `step` (0-based) for a step schedule: the same warm-up, then gamma once for
    every drop step reached (optim.lr_steps, converted to steps; the fine-tuning protocols' 10x drops)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return gamma ** sum(step >= drop for drop in drop_steps)
