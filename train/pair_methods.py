"""The two-view methods of the training loop (method=simclr, method=moco): their step up to the loss, and MoCo's
update after the optimiser step.

Both read the image view I and a second, independently augmented image view (data.recipe.jigsaw_view=image: the
model batch's patches (B, 1, 3, S, S)). Both are written so that N processes train like one process with the
global batch (train/ranks.py):
- simclr: every rank's embeddings are gathered with gradients (gather_with_grad), so each view's negatives are the
  other 2N - 2 views of the whole global batch, as on one process;
- moco: the keys of the whole global batch are encoded in loss.moco_bn_groups shuffled groups whatever the process
  count (model/moco.py, "Shuffled BatchNorm"), and every rank enqueues all of them, in the global batch's order,
  after the optimiser step: the loss of step t scores the queue as it was before step t's keys.
"""
from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch.profiler import record_function

from pirl_trainer.model.losses import moco_loss, nt_xent_loss
from pirl_trainer.model.moco import MoCoNet, MomentumKeys, group_bounds, shuffle_order
from pirl_trainer.common.rng import PURPOSE_MOCO_SHUFFLE, counter_words, derive_seed
from pirl_trainer.train.config import ConfigError, PirlConfig
from pirl_trainer.train.ranks import gather_with_grad, global_index, pad_to

PAIR_METHODS = ("simclr", "moco")


def pair_losses(cfg: PirlConfig, net, keys: MomentumKeys | None, image: torch.Tensor, patches: torch.Tensor,
                index: torch.Tensor, step: int, autocast, accelerator: Accelerator, loader) -> dict:
    """The step of method=simclr or moco up to the loss: losses with `loss` and the method's LOG_TERMS; for moco
    also `keys` (n_global, D), the global batch's keys in its order, for after_step. index: the batch's global
    sample indexes on the device. keys: MomentumKeys (build_momentum_keys) for moco, None for simclr."""
    second = patches[:, 0]  # (B, 3, S, S): the second image view
    if cfg.run.channels_last:
        second = second.contiguous(memory_format=torch.channels_last)
    if cfg.method == "simclr":
        return simclr_losses(cfg, net, image, second, index, autocast, accelerator, loader.max_batch_size)
    return moco_losses(cfg, net, keys, image, second, index, step, autocast, accelerator, loader.max_batch_size)


def simclr_losses(cfg: PirlConfig, net, image: torch.Tensor, second: torch.Tensor, index: torch.Tensor, autocast,
                  accelerator: Accelerator, max_batch: int) -> dict:
    """NT-Xent of this rank's 2n views over the 2N views of every rank. Each rank pads its embeddings to
    `max_batch` rows (the loader's largest batch: fixed shapes, no size exchange); the padding rows are left out
    of every softmax by their index -1."""
    with autocast:
        z1, z2 = net(image, second)  # (n, D) each, unit norm
    z1, z2 = z1.float(), z2.float()
    with record_function("loss"):
        if accelerator.num_processes == 1:
            return nt_xent_loss(z1, z2, z1, z2, 0, cfg.loss.simclr_tau)
        both = gather_with_grad(pad_to(torch.stack([z1, z2], dim=1), max_batch, 0.0))  # (world * max_batch, 2, D)
        valid = global_index(accelerator, index, max_batch) >= 0
        return nt_xent_loss(z1, z2, both[:, 0], both[:, 1], accelerator.process_index * max_batch,
                            cfg.loss.simclr_tau, valid)


def moco_losses(cfg: PirlConfig, net, keys: MomentumKeys, image: torch.Tensor, second: torch.Tensor,
                index: torch.Tensor, step: int, autocast, accelerator: Accelerator, max_batch: int) -> dict:
    """MoCo v2's InfoNCE of this rank's queries against their keys and the queue (before this step's keys)."""
    with autocast:
        q = net(image)  # (n, D) unit norm
    with torch.no_grad(), autocast, record_function("keys"):
        local, in_order = shuffled_keys(cfg, keys, second, index, step, accelerator, max_batch)
    with record_function("loss"):
        losses = moco_loss(q, local, keys.queue, cfg.loss.moco_tau)
    losses["keys"] = in_order
    return losses


@torch.no_grad()
def shuffled_keys(cfg: PirlConfig, keys: MomentumKeys, second: torch.Tensor, index: torch.Tensor, step: int,
                  accelerator: Accelerator, max_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's keys (n, D), the global batch's keys (N, D) in its order), each key encoded in its shuffled
    BatchNorm group (model/moco.py): the global batch of key images, ordered by a counter draw of (seed, step,
    global index), cut into loss.moco_bn_groups groups; rank r encodes groups r*G/W .. (r+1)*G/W - 1 and the
    ranks exchange their keys. The groups are the same samples on any number of processes.

    With several processes the global batch's size is read on the host once per step (one synchronisation): a
    corrupt sample left out on another rank changes it, and the groups' shapes depend on it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        images, rows, total = second, index, index.shape[0]
    else:
        images = accelerator.gather(pad_to(second.contiguous(), max_batch, 0.0))  # (world * max_batch, 3, S, S)
        rows = global_index(accelerator, index, max_batch)  # -1 on padding
        total = int((rows >= 0).sum())
    if cfg.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    valid = rows >= 0
    words = counter_words(derive_seed(PURPOSE_MOCO_SHUFFLE, cfg.run.seed, step), rows.clamp(min=0), 1)[:, 0]
    order = shuffle_order(words, valid)  # (P,) positions; the first `total` are the samples, shuffled
    groups = cfg.loss.moco_bn_groups
    bounds = group_bounds(total, groups)
    per_rank = groups // world
    mine = keys.encode_groups(images, order, bounds, rank * per_rank, (rank + 1) * per_rank)
    if world == 1:
        shuffled = mine  # (N, D) in shuffled order
    else:
        counts = [bounds[(r + 1) * per_rank] - bounds[r * per_rank] for r in range(world)]
        gathered = accelerator.gather(pad_to(mine, max(counts), 0.0)).view(world, max(counts), -1)
        shuffled = torch.cat([gathered[r, :count] for r, count in enumerate(counts)])
    placed = shuffled.new_zeros(len(rows), shuffled.shape[1]).index_copy_(0, order[:total], shuffled)  # unshuffled
    if world == 1:
        return placed, placed
    local = placed[rank * max_batch: rank * max_batch + index.shape[0]]
    return local, placed.index_select(0, order[:total].sort().values)  # the padding rows dropped


def after_step(keys: MomentumKeys, query, losses: dict) -> None:
    """MoCo's update once the optimiser has stepped: the key encoder's EMA of the query network (`query`, the
    unwrapped module), then the global batch's keys into the queue, for the next step's negatives."""
    with record_function("momentum_keys"):
        keys.momentum_update(query)
        keys.enqueue(losses["keys"])


def build_momentum_keys(cfg: PirlConfig, net, accelerator: Accelerator, loader) -> MomentumKeys:
    """method=moco's key encoder (a copy of `net`, the query network before DDP) and queue on the training device.
    ConfigError for groups that do not divide among the processes, a group of fewer than 2 samples at the
    epoch's smallest global batch (BatchNorm needs 2), a queue shorter than a global batch or longer than the data
    set."""
    world, groups = accelerator.num_processes, cfg.loss.moco_bn_groups
    if groups < 1 or groups % world:
        suggestion = world * max(1, math.ceil(groups / world))
        raise ConfigError(f"loss.moco_bn_groups={groups} must be a positive multiple of the process count ({world}): "
                          f"each process encodes the same number of key groups (e.g. --loss.moco_bn_groups="
                          f"{suggestion})")
    sizes = {loader.global_batch_size(0), loader.global_batch_size(len(loader) - 1)}
    if min(sizes) < 2 * groups:
        raise ConfigError(f"loss.moco_bn_groups={groups} leaves fewer than 2 samples in a group at the global batch "
                          f"of {min(sizes)} (the last step of an epoch of {loader.epoch_samples}): lower "
                          "loss.moco_bn_groups or raise data.batch_size")
    if cfg.loss.moco_queue_size < max(sizes):
        raise ConfigError(f"loss.moco_queue_size={cfg.loss.moco_queue_size} is shorter than a global batch "
                          f"({max(sizes)}): one step's keys would overwrite each other")
    if cfg.loss.moco_queue_size > loader.num_samples:
        # MoCo's 65,536 keys are 5 % of ImageNet; a queue longer than an epoch holds several keys of every sample
        # (each query's own among its negatives) and, for its first epochs, the random initial rows
        raise ConfigError(f"loss.moco_queue_size={cfg.loss.moco_queue_size} exceeds the {loader.num_samples} samples "
                          f"of {cfg.data.shards}: set it below that (e.g. --loss.moco_queue_size="
                          f"{2 ** int(math.log2(max(1, loader.num_samples // 2)))})")
    encoder = MoCoNet(cfg.model.arch, cfg.model.embed_dim)
    keys = MomentumKeys(encoder, net, cfg.loss.moco_queue_size, cfg.model.embed_dim, cfg.loss.moco_momentum)
    keys = keys.to(accelerator.device)
    if cfg.run.channels_last:
        keys.encoder.to(memory_format=torch.channels_last)
    return keys
