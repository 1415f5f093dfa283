"""The memory bank split across ranks: each rank owns 1/world of the rows, no rank has it all.

The same calls as model/memory_bank.py's replicated MemoryBank (draw_negatives, fetch, negatives, update,
state_dict, load_state_dict), so the training loop and the loss do not change:
- rows: row i belongs to rank i % world, at local position i // world. Interleaved rather than contiguous
  blocks: shard sizes differ by at most one row for any world size; any run of indexes (a class-sorted file
  list, a shuffled batch) spreads evenly over the owners, so fetches and updates load every rank alike; and the
  owner of a row is one remainder, no table. Memory per rank: bank / world (+ one scratch row).
- draws: the replicated bank's (model/memory_bank.py), a function of global row ids only.
- fetch of ids that are the same on every rank (a shared draw in counter mode, with the global batch as
  `exclude`; or the all-gathered global batch): each owner fills the rows it owns into a (N, dim) buffer of
  zeros and one all_reduce(SUM) gives every rank all N rows, exactly (x + 0 = x). Fixed shapes, no host sync.
  Bytes per rank: 2 (world - 1) / world * N * dim * itemsize (ring all-reduce), about twice an all-gather of
  exactly-sized pieces, whose sizes would be data-dependent.
- fetch of per-rank ids (per-sample draws, each rank's own positives): routed with all_to_all_single (which gloo
  supports, as NCCL does): requests sorted by owner, counts exchanged, ids sent, rows sent back. The split sizes
  must be host ints: one host sync per such fetch. Bytes per rank: (world - 1) / world * N * (dim * itemsize + 8).
- update: takes the rows of the whole global batch, as the replicated bank does (the loop all-gathers them
  already); every rank applies the ones it owns; fixed shapes (others go to the scratch row), no communication.
- state_dict: the WHOLE bank in global row order, {"rows": (num_rows, dim)}, the replicated bank's format: a
  checkpoint resumes on any process count, sharded or replicated. Collective (every rank calls it); gathered
  in chunks to rank `dst` on the CPU. load_state_dict: every rank takes its rows from the whole bank.
Without an initialised process group (or with world 1) the bank is one shard holding every row.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

from pirl_trainer.model.memory_bank import (
    broadcast_source, check_bank_dtype, check_update, counter_unit_rows, draw_negatives, ema_rows,
)

# Rows per chunk of a state_dict gather, all ranks together: bounds the device memory it needs (64 MB of fp32
# rows at dim 128).
STATE_CHUNK_ROWS = 2**17


class ShardedMemoryBank:
    """`num_rows` unit vectors of size `dim` split over the ranks of `group` (default: the whole world).

    Initial rows: row i is a function of (init_seed, i) (memory_bank.counter_unit_rows), so the bank starts the
    same whatever the number of processes, and the same as MemoryBank(num_rows, dim, init_seed=init_seed).
    dtype: float32, bfloat16 or float16 storage, as MemoryBank (EMA in float32, rounded once when stored).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        init_seed: int = 0,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
    ):
        if num_rows < 2:
            raise ValueError(f"a memory bank needs at least 2 rows to have negatives, got {num_rows}")
        check_bank_dtype(dtype)
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.num_rows, self.dim = num_rows, dim
        owned = torch.arange(self.rank, num_rows, self.world_size, device=device)  # hashed where the rows live
        rows = counter_unit_rows(init_seed, owned, dim).to(device)
        # One scratch row at the end: the target of masked writes, so updates keep fixed shapes.
        self._shard = torch.cat([rows, rows.new_zeros(1, dim)]).to(dtype)

    @property
    def shard(self) -> torch.Tensor:
        """This rank's rows (num_rows / world, dim): global row rank + world * j at position j."""
        return self._shard[:-1]

    @property
    def device(self) -> torch.device:
        return self._shard.device

    @property
    def dtype(self) -> torch.dtype:
        return self._shard.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held by this process (about the whole bank's / world)."""
        return self._shard.numel() * self._shard.element_size()

    def to(self, device: torch.device | str) -> "ShardedMemoryBank":
        self._shard = self._shard.to(device)
        return self

    def draw_negatives(
        self,
        index: torch.Tensor,
        num: int,
        shared: bool = False,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        step: int | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MemoryBank.draw_negatives. A shared draw must be the same on every rank (it is fetched with one
        all-reduce): on more than one rank it takes counter draws (seed=, step=) and the global batch as
        `exclude`."""
        if shared and self.world_size > 1 and seed is None:
            raise ValueError(
                "a sharded bank's shared draw must be the same on every rank: pass seed= and step= (counter "
                "draws) and exclude= the global batch's indexes, not a per-rank generator"
            )
        return draw_negatives(self.num_rows, index, num, shared, generator, seed, step, exclude, self.device)

    def fetch(
        self, rows: torch.Tensor, dtype: torch.dtype | None = torch.float32, *, same_on_all_ranks: bool | None = None
    ) -> torch.Tensor:
        """The vectors of `rows` (int64, any shape) -> rows.shape + (dim,) in `dtype` (None: the bank's).

        Collective: every rank calls it, in the same order. same_on_all_ranks (default: True for a broadcast
        view, i.e. a shared draw, else False): True promises that every rank passes the same ids, fetched with one
        all-reduce and no host sync (a shared draw; the all-gathered global batch, then take this rank's slice);
        False routes each rank's own ids to their owners with all_to_all (one host sync for the split sizes).
        Ids < 0 (padding) give zero rows.
        """
        with record_function("bank_gather"):
            source = broadcast_source(rows)
            if same_on_all_ranks is None:
                same_on_all_ranks = source.shape != rows.shape
            ids = source.reshape(-1).to(device=self.device, dtype=torch.int64)
            if self.world_size == 1:
                vectors = self._local_rows(ids)
            elif same_on_all_ranks:
                vectors = self._fetch_same_ids(ids)
            else:
                vectors = self._fetch_routed(ids)
            if dtype is not None:
                vectors = vectors.to(dtype)
            return vectors.view(*source.shape, self.dim).expand(*rows.shape, self.dim)

    def negatives(self, neg_rows: torch.Tensor) -> torch.Tensor:
        """The negatives for pirl_loss: a shared draw fetched once (an expanded (B, K, dim) view), per-sample draws
        as (B, K, dim) rows (routed: the rows had to cross the network anyway). float32."""
        return self.fetch(neg_rows)

    def _owned(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mine (N,) bool, local position (N,), the scratch row where not mine)."""
        mine = (ids >= 0) & (ids % self.world_size == self.rank)
        local = torch.where(mine, ids // self.world_size, self._shard.shape[0] - 1)
        return mine, local

    def _local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        mine, local = self._owned(ids)
        rows = self._shard.index_select(0, local)
        return torch.where(mine.unsqueeze(1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    def _fetch_same_ids(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._local_rows(ids)  # this rank's rows, zeros elsewhere
        dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=self.group)  # one owner per row: the sum is exact
        return rows

    def _fetch_routed(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids >= 0
        ids = torch.where(valid, ids, 0)
        owner = ids % self.world_size
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = torch.stack([send_counts, recv_counts]).cpu().tolist()  # the host sync: split sizes
        requested = ids.new_empty(sum(recv))
        dist.all_to_all_single(requested, ids.index_select(0, order), recv, send, group=self.group)
        served = self._shard.index_select(0, requested // self.world_size)  # (sum(recv), dim)
        back = served.new_empty(ids.shape[0], self.dim)
        dist.all_to_all_single(back, served, send, recv, group=self.group)
        rows = torch.empty_like(back).index_copy_(0, order, back)  # back to the request order
        return torch.where(valid.unsqueeze(1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, momentum: float = 0.5) -> None:
        """MemoryBank.update on the rows this rank owns: index (N,), feats (N, dim) are the whole global batch's
        (every rank passes the same, -1 padding ignored). No communication, no host sync."""
        with record_function("bank_update_rows"):
            check_update(index, feats, self.dim, momentum)
            index = index.to(device=self.device, dtype=torch.int64)
            _, local = self._owned(index)
            new = ema_rows(self._shard.index_select(0, local), feats.to(self.device), momentum)
            self._shard.index_copy_(0, local, new.to(self.dtype))  # not mine: into the scratch row

    def state_dict(self, dst: int | None = 0) -> dict:
        """{"rows": (num_rows, dim) CPU tensor in the bank's dtype}: the whole bank, on rank `dst` of the group
        (other ranks get {}), or on every rank with dst=None. Collective: call it on every rank, before the main
        process's `if`. Gathered STATE_CHUNK_ROWS rows at a time."""
        world, dim = self.world_size, self.dim
        if world == 1:
            return {"rows": self.shard.cpu().clone()}
        per_rank = -(-self.num_rows // world)  # local rows of rank 0, the largest shard
        chunk = max(1, STATE_CHUNK_ROWS // world)
        want = dst is None or self.rank == dst
        full = torch.empty(per_rank, world, dim, dtype=self.dtype) if want else None
        padded = torch.zeros(per_rank, dim, dtype=self.dtype, device=self.device)
        padded[: self.shard.shape[0]] = self.shard
        for p0 in range(0, per_rank, chunk):
            piece = padded[p0:p0 + chunk].contiguous()
            if dst is None:
                gathered = piece.new_empty(world * piece.shape[0], dim)  # gloo takes the concatenated shape
                dist.all_gather_into_tensor(gathered, piece, group=self.group)
                gathered = gathered.view(world, -1, dim)
            else:
                gathered = [torch.empty_like(piece) for _ in range(world)] if want else None
                dist.gather(piece, gathered, group=self.group, group_dst=dst)
                gathered = torch.stack(gathered) if want else None
            if want:
                full[p0:p0 + piece.shape[0]] = gathered.transpose(0, 1).cpu()  # row p * world + r
        return {"rows": full.view(per_rank * world, dim)[: self.num_rows]} if want else {}

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's rows from a whole bank ({"rows": (num_rows, dim)}, any dtype, from a sharded or a
        replicated bank saved on any number of processes). Not collective."""
        rows = state["rows"]
        if rows.shape != (self.num_rows, self.dim):
            raise ValueError(f"expected a bank of shape ({self.num_rows}, {self.dim}), got {tuple(rows.shape)}")
        self.shard.copy_(rows[self.rank::self.world_size])
