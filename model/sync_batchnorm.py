"""Synchronised BatchNorm: batch statistics over every rank's samples, so N processes train like 1.

torch's nn.SyncBatchNorm is the one to use on GPUs (NCCL, fused kernels), but it refuses CPU tensors. This
module's GlooSyncBatchNorm2d does the same maths with plain tensor ops and one differentiable all-reduce
(torch.distributed.nn.functional.all_reduce, which works over gloo), so CPU multi-process runs and their tests
get it too. convert_sync_batchnorm() picks torch's on CUDA and this one elsewhere.

Maths, per channel, with n_r samples*pixels on rank r: sum and sum of squares are all-reduced, mean = S / n,
var = Q / n - mean^2 (biased, for normalising), running_var gets the unbiased n / (n - 1) form, as
nn.BatchNorm2d does on one process. The all-reduce's backward all-reduces the gradients of (S, Q), which is
exactly the gradient of the single-process batch statistics.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics cover the whole process group (any backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlooSyncBatchNorm2d expects (N, C, H, W), got {tuple(x.shape)}")
        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)  # differentiable SUM over the group
        c = self.num_features
        total, sq_total, n = stats[:c], stats[c:2 * c], stats[2 * c]
        mean = total / n
        var = (sq_total / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var), momentum)
        shape = (1, c, 1, 1)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _convert_to_gloo(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm2d):
        sync = GlooSyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync.to(device=next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        module.add_module(name, _convert_to_gloo(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of module synchronised over the default process group: torch's on CUDA, ours elsewhere.

    A no-op on one process in effect (both fall back to plain BatchNorm statistics there).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_gloo(module)
