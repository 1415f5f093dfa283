"""The pretraining config's checks beyond its types (train/config.py checks those): every choice a known one,
every number in range, the method's own rules (train/methods.py check_method). train() runs them before anything
is built, so a bad value fails in a second with a ConfigError that names the key, not at the first step.

Checks that need the data (loss.num_negatives against the sample count, data.subset against the shards,
data.decode_device against the training device) run where the loader is built.
"""
from __future__ import annotations

import torch

from pirl_trainer import pipelines
from pirl_trainer.model.memory_bank import check_num_negatives
from pirl_trainer.pipelines.augment import KERNEL_CHOICES
from pirl_trainer.train.config import ConfigError, PirlConfig
from pirl_trainer.train.methods import check_method

BANK_KINDS = ("replicated", "sharded")  # loss.bank: model/memory_bank.py, model/sharded_bank.py
BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # loss.bank_dtype


def check_config(cfg: PirlConfig) -> None:
    """ConfigError naming the first key of `cfg` that holds a value train() cannot run with."""
    cfg.data.recipe.validate()
    if cfg.loss.kind not in ("nce", "infonce"):
        raise ConfigError(f"loss.kind must be 'nce' or 'infonce', got {cfg.loss.kind!r}")
    if cfg.data.augment_kernels not in KERNEL_CHOICES:
        raise ConfigError(f"data.augment_kernels must be one of {KERNEL_CHOICES}, got {cfg.data.augment_kernels!r}")
    if cfg.data.backend not in pipelines.BACKENDS:
        raise ConfigError(f"data.backend must be one of {sorted(pipelines.BACKENDS)}, got {cfg.data.backend!r}")
    try:
        cfg.data.dali.validate()
    except ValueError as err:
        raise ConfigError(f"data.{err}") from None
    if cfg.loss.bank not in BANK_KINDS:
        raise ConfigError(f"loss.bank must be one of {BANK_KINDS}, got {cfg.loss.bank!r}")
    if cfg.loss.bank_dtype not in BANK_DTYPES:
        raise ConfigError(f"loss.bank_dtype must be one of {tuple(BANK_DTYPES)}, got {cfg.loss.bank_dtype!r}")
    if cfg.data.max_skipped_per_epoch < 0:
        raise ConfigError(f"data.max_skipped_per_epoch must be >= 0, got {cfg.data.max_skipped_per_epoch}")
    check_method(cfg)
    if cfg.knn.every < 0 or (cfg.knn.every > 0 and not cfg.knn.test_shards):
        raise ConfigError(f"knn.every must be >= 0 and, when > 0, knn.test_shards set (got every={cfg.knn.every}, "
                          f"test_shards={cfg.knn.test_shards!r})")
    if cfg.loss.bank_init not in ("random", "features"):
        raise ConfigError(f"loss.bank_init must be 'random' or 'features', got {cfg.loss.bank_init!r}")
    if any(epoch <= 0 for epoch in cfg.optim.lr_steps):
        raise ConfigError(f"optim.lr_steps must be epochs > 0, got {list(cfg.optim.lr_steps)}")


def check_negatives(cfg: PirlConfig, num_samples: int) -> None:
    """ConfigError where loss.num_negatives cannot be drawn from the training shards' `num_samples` (a contrastive
    method's bank: its negatives are other samples' rows)."""
    try:
        check_num_negatives(cfg.loss.num_negatives, num_samples)
    except ValueError as err:
        raise ConfigError(f"loss.num_negatives = {cfg.loss.num_negatives} does not fit {cfg.data.shards} "
                          f"({num_samples} samples): {err}") from None
