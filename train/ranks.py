"""What the training loop computes across ranks, so that N processes x batch B train like 1 process x N*B.

With the sampler's windows (pipelines/sampler.py) the ranks of step s hold, together, the single process's
batch of step s. What remains to make the runs agree:
- the loss: each rank's mean is weighted by its share of the global batch (the last step's shares may differ
  by one), so DDP's gradient average is the gradient of the global mean;
- the logged losses: the same weighted sums, all-reduced at log steps only (no per-step communication);
- log Z of binary NCE: one estimate over every rank's similarities, not a mean of per-rank estimates;
- the bank update: every rank applies every rank's rows (gather_rows).
BatchNorm statistics are the one thing left per rank; model.sync_bn synchronises them (model/sync_batchnorm.py).
SimCLR scores every view against the whole global batch: gather_with_grad brings every rank's embeddings, with a
backward that returns each rank the gradient of every rank's loss with respect to its rows.
"""

import math

import torch
import torch.distributed as dist
from accelerate import Accelerator


def pad_to(tensor: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """tensor padded along dim 0 to `size` rows of `value`: a fixed shape, known on the host (no size exchange)."""
    if tensor.shape[0] > size:
        raise ValueError(f"a batch of {tensor.shape[0]} rows exceeds the padded size {size}")
    pad = tensor.new_full((size - tensor.shape[0], *tensor.shape[1:]), value)
    return torch.cat([tensor, pad])


def gather_rows(accelerator: Accelerator, index: torch.Tensor, feats: torch.Tensor, size: int):
    """Every rank's (index, features), so each bank (replica or shard owner) applies the whole global update.

    Each rank pads to `size` (the loader's largest batch) with index -1, which the banks skip: fixed shapes, no
    host synchronisation, no boolean mask.
    """
    if accelerator.num_processes == 1:
        return index, feats
    return global_index(accelerator, index, size), accelerator.gather(pad_to(feats, size, 0))


def global_index(accelerator: Accelerator, index: torch.Tensor, size: int) -> torch.Tensor:
    """Every rank's sample indexes of this step, -1 where a batch was padded to `size`: what a batch-shared
    negative draw must exclude for every rank to draw the same rows."""
    if accelerator.num_processes == 1:
        return index
    return accelerator.gather(pad_to(index, size, -1))


@torch.no_grad()
def global_log_z(accelerator: Accelerator, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                 num_data: int) -> torch.Tensor:
    """log Z = log(num_data) + log mean(exp(s / tau)) over the similarities of every rank (model.losses'
    estimate_log_z, for the whole global batch): per-rank logsumexp and counts, gathered and combined."""
    logits = torch.cat([pos.reshape(-1), neg.reshape(-1)]).float() / tau
    lse = torch.logsumexp(logits, dim=0).reshape(1)
    count = torch.tensor([float(logits.numel())], device=logits.device)
    if accelerator.num_processes > 1:
        lse, count = accelerator.gather(lse), accelerator.gather(count)
    return math.log(num_data) + torch.logsumexp(lse, dim=0) - torch.log(count.sum())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered rows' gradients over the ranks (an all-reduce; gloo has no
    reduce-scatter) and hands each rank its own rows' sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(world * n, ...) every rank's `tensor` (n rows each: pad_to a common size first), in rank order, with
    gradients: a loss on rank r that reads rank s's rows sends its gradient back to rank s. The identity on one
    process. With each rank's loss weighted by its share of the global batch and DDP's gradient average, N
    processes then get the gradient of one process holding the whole batch (tests/model/test_nt_xent.py)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
