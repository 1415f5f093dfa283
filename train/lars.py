"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum whose
step for each parameter tensor is scaled by a trust ratio eta * ||w|| / ||g + wd * w||, so that every layer moves
by about the same fraction of its norm whatever the batch size. SimCLR trains with it at batches of 4,096.

The trust ratio and its fallbacks follow SimCLR's lars_optimizer.py (1 where ||w|| or the update's norm is 0).
The rate is applied after the momentum buffer, as torch.optim.SGD does (and MoCo v3's LARS); SimCLR's default
"classic" momentum puts the rate inside the buffer instead. The two agree while the rate is constant; this way a
parameter group without adaptation steps exactly like torch.optim.SGD, and a checkpoint's `momentum_buffer`
means what it means for SGD.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rates. Per parameter group: `lr`, `momentum`, `weight_decay`,
    `nesterov`, `eta` (the trust coefficient) and `adapt` (False: plain SGD for the group, no trust ratio; the
    groups of biases and BatchNorm weights, built by train/optimizers.py).

    The trust ratio stays on the parameter's device (torch.where, no `.item()`): no host synchronisation."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, nesterov: bool = False, adapt: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0, got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov momentum needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov, adapt=adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; `closure` re-evaluates the loss (torch's contract)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=decay) if decay else p.grad
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    # SimCLR's fallback: a zero weight (a fresh layer) or a zero update keeps the plain rate
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                    update = update * trust
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update.detach().clone()
                    else:
                        buf.mul_(momentum).add_(update)
                    update = update.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(update, alpha=-lr)
        return loss
