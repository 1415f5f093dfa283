"""CPU process groups (gloo, torch.multiprocessing.spawn) for the tests that check a distributed code path against one
process holding the whole batch: a function run on every rank, and the gather the training loop's accelerator does."""
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on the shared test machine: intra-op threads would only fight over its cores
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), f"{out_dir}/rank{rank}.pt")
        # no rank tears gloo down while another still has a collective in flight: that rank would abort at exit
        # ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, world: int, out_dir: Path, *args) -> list:
    """fn(rank, *args) in `world` spawned processes of one gloo group (its rendezvous file and the results written in
    the empty folder `out_dir`); returns each rank's result, in rank order. `fn` must be a module-level function
    (spawn pickles it by name); its result goes through torch.save and torch.load(weights_only=True), so it holds
    tensors, numbers, strings and lists, tuples or dicts of them."""
    mp.spawn(_rank, args=(world, str(out_dir), fn, args), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Accelerate's gather on the current group: every rank's `tensor` (same shape on all), concatenated along
    dim 0 in rank order."""
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out
