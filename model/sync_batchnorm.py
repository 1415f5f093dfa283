"""Synchronised BatchNorm: batch statistics over every rank's samples, so N processes train like 1.

torch's nn.SyncBatchNorm is the one to use on GPUs (NCCL, fused kernels), but it refuses CPU tensors. This
module's GlooSyncBatchNorm2d (and GlooSyncBatchNorm1d, for the heads) does the same maths with plain tensor ops
and one differentiable all-reduce (torch.distributed.nn.functional.all_reduce, which works over gloo), so CPU
multi-process runs and their tests get it too. convert_sync_batchnorm() picks torch's on CUDA and this one elsewhere.

Maths, per channel: each rank r computes its count n_r, mean m_r and sum of squared deviations M2_r; every
rank's triple is exchanged (one all-reduce of a (world, 2C+1) tensor holding each rank's row), and the global
statistics are combined as Chan et al.'s parallel variance does: mean = sum n_r m_r / n,
M2 = sum (M2_r + n_r (m_r - mean)^2), var = M2 / n (biased, for normalising; running_var gets the unbiased
n / (n - 1) form, as nn.BatchNorm2d does on one process). Not sum(x^2)/n - mean^2: on real activations, where a
channel's mean is large against its spread, that cancellation cost 0.5 % of the gradient in float32. The
all-reduce's backward all-reduces the gradients of the exchanged rows, which makes the gradient exactly that of
the single-process batch statistics.
"""

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _synced_batchnorm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """bn's training-mode forward with statistics over every rank's samples: per channel (dim 1) over all other dims."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 at least
    c = bn.num_features
    dims = [0, *range(2, x.dim())]
    shape = (1, c, *[1] * (x.dim() - 2))
    count = xf.numel() // c
    local_mean = xf.mean(dim=dims)
    local_m2 = (xf - local_mean.view(shape)).square().sum(dim=dims)
    rows = torch.zeros(_world(), 2 * c + 1, device=x.device, dtype=xf.dtype)
    mine = torch.cat([local_mean.new_full((1,), float(count)), local_mean, local_m2])
    rows = rows.index_copy(0, torch.tensor([dist.get_rank()], device=x.device), mine.unsqueeze(0))
    with warnings.catch_warnings():  # its replacement (_functional_collectives) is private and not autograd-ready
        warnings.simplefilter("ignore", FutureWarning)
        rows = all_reduce(rows)  # differentiable SUM: every rank's row, on every rank
    n_r, means, m2s = rows[:, :1], rows[:, 1:c + 1], rows[:, c + 1:]
    n = n_r.sum()
    mean = (n_r * means).sum(dim=0) / n
    var = (m2s + n_r * (means - mean).square()).sum(dim=0) / n
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean), momentum)
            bn.running_var.lerp_(unbiased.detach().to(bn.running_var), momentum)
    out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out.to(x.dtype)


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics cover the whole process group (any backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlooSyncBatchNorm2d expects (N, C, H, W), got {tuple(x.shape)}")
        return _synced_batchnorm(self, x)


class GlooSyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d (the heads' BatchNorm: SimCLR's, model.head_norm=bn) over the whole process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        if x.dim() not in (2, 3):
            raise ValueError(f"GlooSyncBatchNorm1d expects (N, C) or (N, C, L), got {tuple(x.shape)}")
        return _synced_batchnorm(self, x)


_GLOO_SYNC = {nn.BatchNorm2d: GlooSyncBatchNorm2d, nn.BatchNorm1d: GlooSyncBatchNorm1d}


def _convert_to_gloo(module: nn.Module) -> nn.Module:
    if type(module) in _GLOO_SYNC:  # plain BatchNorm1d / 2d, not already a synchronised one
        sync = _GLOO_SYNC[type(module)](module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync.to(device=next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        module.add_module(name, _convert_to_gloo(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm1d / 2d of module synchronised over the default process group: torch's on CUDA (which takes
    every BatchNorm), ours elsewhere.

    A no-op on one process in effect (both fall back to plain BatchNorm statistics there).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_gloo(module)
