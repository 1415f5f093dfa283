"""The pretraining optimiser named by optim.optimizer: "sgd" (the paper's) or "lars" (train/lars.py, for large
global batches, as SimCLR)."""
from __future__ import annotations

import torch

from pirl_trainer.train.config import ConfigError, OptimConfig
from pirl_trainer.train.lars import LARS

OPTIMIZERS = ("sgd", "lars")


def lars_param_groups(net: torch.nn.Module, weight_decay: float, exclude_1d: bool) -> list[dict]:
    """LARS's parameter groups: the weights (decay and adaptation), then, with `exclude_1d`, the biases and
    BatchNorm scales and shifts (every parameter of one dimension: neither decay nor adaptation, SimCLR's
    exclude_from_weight_decay / exclude_from_layer_adaptation). Empty groups are left out."""
    params = list(net.parameters())
    if not exclude_1d:
        return [{"params": params, "weight_decay": weight_decay, "adapt": True}]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "adapt": True},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False}]
    return [group for group in groups if group["params"]]


def build_optimizer(optim_cfg: OptimConfig, net: torch.nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    """The optimiser of `optim_cfg.optimizer` over `net`'s parameters at the (already batch-scaled) `peak_lr`; the
    schedule multiplies every group's rate alike. An unknown name or a bad LARS setting is a ConfigError."""
    name = optim_cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay, nesterov=optim_cfg.nesterov)
    if name == "lars":
        if optim_cfg.lars_eta <= 0:
            raise ConfigError(f"optim.lars_eta must be > 0, got {optim_cfg.lars_eta}")
        if optim_cfg.nesterov and optim_cfg.momentum <= 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
        groups = lars_param_groups(net, optim_cfg.weight_decay, optim_cfg.lars_exclude_1d)
        return LARS(groups, lr=peak_lr, momentum=optim_cfg.momentum, eta=optim_cfg.lars_eta,
                    nesterov=optim_cfg.nesterov)
    raise ConfigError(f"optim.optimizer must be one of {OPTIMIZERS}, got {name!r}")
