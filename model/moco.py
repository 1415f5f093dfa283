"""MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved baselines"): the query network, and the momentum key
encoder with its queue of keys, kept apart from the network that gradients train.

MoCoNet is the query encoder q = normalize(head(trunk(x))), the module the optimiser (and DDP) sees.
MomentumKeys owns the key encoder, an exponential moving average of MoCoNet's parameters that no gradient ever
reaches, and the queue of the last K keys, the negatives. It is not part of the DDP-wrapped module: DDP would
broadcast its buffers (the queue: 65,536 x 128 floats, 32 MB) from rank 0 on every forward, and every rank
updates its own replica identically anyway (the same EMA of the same parameters, the same global batch of keys).

Shuffled BatchNorm. A key encoder whose BatchNorm normalised a sample's key with the statistics of the batch its
query sits in would let the model find the positive through those statistics (the "leak" MoCo section 3.3
describes) instead of learning a representation. MoCo shuffles the key images across its 8 GPUs, so each GPU's
BatchNorm sees another mix of samples than its queries' GPU. Here the global batch of key images is permuted by a
counter draw of (seed, step) and cut into `groups` groups, each encoded alone (its own batch statistics), then the
keys are put back in order (shuffle_order, group_bounds, MomentumKeys.encode_groups). Why not SyncBatchNorm:
global statistics would hold the queries' own samples, the very leak; and unlike a shuffle across GPUs the groups
do not depend on the number of processes, so one process trains as MoCo does (its keys' statistics are not its
queries') and N processes encode exactly the keys of one (each encodes groups / N of the groups).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pirl_trainer.model.heads import MoCoV2Head
from pirl_trainer.model.pirl import frozen_bn_stats
from pirl_trainer.model.trunk import build_trunk

_PAD_WORD = 2**32  # above every 32-bit counter word: padding rows sort after every sample


class MoCoNet(nn.Module):
    """The query encoder: trunk + MoCo v2's MLP head (feature_dim -> feature_dim -> embed_dim, ReLU, no
    BatchNorm); forward(image (B, 3, S, S)) -> (B, embed_dim) L2-normalised. The trunk is `trunk`, which the
    linear probe, the kNN monitor and tools/export.py read."""

    def __init__(self, arch: str = "resnet50", embed_dim: int = 128):
        super().__init__()
        self.trunk, self.feature_dim = build_trunk(arch)
        self.head = MoCoV2Head(self.feature_dim, self.feature_dim, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(image)), dim=1)


def group_bounds(num: int, groups: int) -> list[int]:
    """groups + 1 bounds cutting `num` rows into `groups` runs as even as possible, the first num % groups one
    row longer (numpy's array_split): group g is rows bounds[g]:bounds[g + 1]."""
    if groups < 1 or num < groups:
        raise ValueError(f"cannot cut {num} rows into {groups} non-empty groups")
    size, extra = divmod(num, groups)
    return [g * size + min(g, extra) for g in range(groups + 1)]


def shuffle_order(words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P,) int64 positions of the P rows sorted by their random `words` (P,) int64 (32-bit counter words, a
    function of each row's sample, not of its position), rows with valid False (padding) last. Stable: tied words
    keep the rows' order, which is the global batch's order on any number of processes; so the first n positions
    are the same samples in the same order on any number of processes."""
    return torch.argsort(torch.where(valid, words, _PAD_WORD), stable=True)


class MomentumKeys(nn.Module):
    """MoCo's key encoder and queue (module docstring). An nn.Module for .to() and state_dict(), never called by
    DDP: state_dict() holds the encoder's weights, the queue (K, D) and the queue's pointer, all a resumed run
    needs, and the same on every rank.

    encoder: a copy of the query network (its weights are copied here); requires_grad is switched off, so no
    gradient ever reaches it. queue_size K: the negatives (K = 65,536 in MoCo); initialised to random unit rows
    from the global RNG, as MoCo (seed it alike on every rank). momentum m: theta_k <- m theta_k + (1 - m) theta_q.
    """

    def __init__(self, encoder: nn.Module, query: nn.Module, queue_size: int, embed_dim: int, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"the key encoder's momentum must be in [0, 1), got {momentum}")
        if queue_size < 1:
            raise ValueError(f"the queue must hold at least one key, got {queue_size}")
        self.encoder = encoder
        self.encoder.load_state_dict(query.state_dict())
        self.encoder.requires_grad_(False)
        self.momentum = momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))  # (K, D)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))  # where the next key goes

    @property
    def queue_size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def momentum_update(self, query: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter, paired by name (query: the unwrapped query
        network, after its optimiser step). The buffers are not averaged: the key encoder's BatchNorm always
        normalises by batch statistics and never reads its running ones (encode)."""
        named = dict(query.named_parameters())
        keys = dict(self.encoder.named_parameters())
        if named.keys() != keys.keys():
            raise ValueError(f"the query network's parameters do not match the key encoder's: "
                             f"{sorted(named.keys() ^ keys.keys())[:3]}")
        key_params = list(keys.values())
        torch._foreach_mul_(key_params, self.momentum)
        torch._foreach_add_(key_params, [named[name].detach() for name in keys], alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised keys of one group of images, normalised by the group's own BatchNorm statistics.
        The running statistics are left as they were: they are never read, and left alone they stay the same
        on every rank, whichever groups a rank encodes."""
        self.encoder.train()
        with frozen_bn_stats(self.encoder):
            return F.normalize(self.encoder(images).float(), dim=1)

    @torch.no_grad()
    def encode_groups(self, images: torch.Tensor, order: torch.Tensor, bounds: list[int], first: int,
                      last: int) -> torch.Tensor:
        """Keys of groups first..last-1, (bounds[last] - bounds[first], D), in shuffled order: group g is the
        images images[order[bounds[g]:bounds[g + 1]]], each group through the encoder alone."""
        return torch.cat([self.encode(images.index_select(0, order[bounds[g]:bounds[g + 1]]))
                          for g in range(first, last)])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (n, D), in order, over the oldest n keys: rows pointer, pointer + 1, ... modulo K (the
        batch need not divide K), and move the pointer past them. On the device, no host read."""
        if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1] or keys.shape[0] > self.queue_size:
            raise ValueError(f"expected at most {self.queue_size} keys of dimension {self.queue.shape[1]}, got "
                             f"{tuple(keys.shape)}")
        rows = (self.pointer + torch.arange(keys.shape[0], device=self.queue.device)) % self.queue_size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.queue_size)
