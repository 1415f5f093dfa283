"""The memory bank M of PIRL (paper section 2.2): one L2-normalised embedding m_I per training image."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function


class MemoryBank(nn.Module):
    """A replicated bank of `num_rows` unit vectors of size `dim`, row i belonging to dataset index i.

    The interface is deliberately three calls (draw_negatives, fetch, update) over global row ids, so a
    sharded bank (ROADMAP.md item 5: a YFCC-100M bank is 51 GB in fp32) can replace this one without
    touching the loss or the training loop.

    `rows` is a registered buffer: it moves with `.to(device)` and is saved in the state_dict, which a
    restart needs. It starts as random unit vectors drawn from the *global* torch RNG at construction,
    so seed torch before building the bank for a reproducible start.

    Negatives per sample: the paper uses N = 32,000 for its ImageNet models and 4,096 for the 400-epoch
    ablations of section 4 (supplement A).
    """

    rows: torch.Tensor

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        if num_rows < 2:
            raise ValueError(f"a memory bank needs at least 2 rows to have negatives, got {num_rows}")
        # Normalised Gaussians are uniform on the unit sphere.
        self.register_buffer("rows", F.normalize(torch.randn(num_rows, dim), dim=1))

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def draw_negatives(
        self,
        index: torch.Tensor,
        num: int,
        shared: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, num) int64 row ids of negatives for the samples whose own rows are `index` (B,).

        shared=False: each sample draws its own `num` rows uniformly from D minus its own row (the paper's
        D_N subset of D without I, section 2.1). Draws are with replacement, as in the reference samplers.
        shared=True: one draw of `num` rows for the whole batch, uniform over the rows outside the batch's
        index set, returned as an expanded view (B, num) of that one draw: one gather of num rows per
        batch instead of B * num (PIRL.md, cost arithmetic). The shared draw syncs with the host once
        (the size of the batch's unique index set); the per-sample draw does not.

        Draws happen on the bank's device; a given generator must live there too.
        """
        with record_function("bank_draw"):
            if index.dim() != 1:
                raise ValueError(f"index must be (B,), got shape {tuple(index.shape)}")
            index = index.to(device=self.rows.device, dtype=torch.int64)
            if shared:
                return self._draw_shared(index, num, generator)
            self._check_num(num, self.num_rows - 1, "each sample's own row")
            # Uniform over {0..n-1} without `own`: draw from n-1 values and skip over `own`.
            draw = torch.randint(
                0, self.num_rows - 1, (index.shape[0], num), generator=generator, device=self.rows.device
            )  # (B, num)
            return draw + (draw >= index.unsqueeze(1)).long()

    def _draw_shared(self, index: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
        excluded = torch.unique(index)  # sorted, duplicates removed
        allowed = self.num_rows - excluded.numel()
        self._check_num(num, allowed, f"the batch's {excluded.numel()} rows")
        draw = torch.randint(0, allowed, (num,), generator=generator, device=self.rows.device)
        # The r-th allowed row is r + #{excluded rows <= it}. Excluded row j (sorted) has e_j - j allowed
        # rows below it, a non-decreasing sequence, so that count is searchsorted(e - j, r, right=True).
        below = excluded - torch.arange(excluded.numel(), device=excluded.device)
        row_ids = draw + torch.searchsorted(below, draw, right=True)  # (num,)
        return row_ids.unsqueeze(0).expand(index.shape[0], num)  # a view: every sample gets the same draw

    def _check_num(self, num: int, available: int, excluded_what: str) -> None:
        if num < 1:
            raise ValueError(f"number of negatives must be >= 1, got {num}")
        if num > available:
            raise ValueError(
                f"asked for {num} negatives but the bank has only {available} rows outside {excluded_what} "
                f"({self.num_rows} rows in all): lower the number of negatives"
            )

    def fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors of `rows` (int64, any shape) -> rows.shape + (dim,).

        A batch-shared draw (an expanded view, stride 0 along some dims) is gathered once and expanded
        back, so fetching it reads num rows, not B * num.
        """
        with record_function("bank_gather"):
            source = rows
            for d in range(rows.dim()):
                if rows.stride(d) == 0 and rows.shape[d] > 1:
                    source = source.narrow(d, 0, 1)  # a broadcast dim: every slice holds the same ids
            ids = source.reshape(-1).to(device=self.rows.device, dtype=torch.int64)
            vectors = self.rows.index_select(0, ids).view(*source.shape, self.dim)
            return vectors.expand(*rows.shape, self.dim)

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, momentum: float = 0.5) -> None:
        """rows[index] <- normalise(momentum * rows[index] + (1 - momentum) * feats); feats (B, dim).

        momentum 0.5 is the paper's weight for the exponential moving average (section 2.3, after [72]).
        No gradient flows into the bank. An index repeated within one call: every copy is computed from
        the same old row and one of them is stored, which one unspecified (index_copy_ semantics). Loaders
        yield each index at most once per batch, so this does not arise in training.
        """
        with record_function("bank_update_rows"):
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {momentum}")
            if feats.shape != (index.shape[0], self.dim):
                raise ValueError(f"feats must be ({index.shape[0]}, {self.dim}), got {tuple(feats.shape)}")
            index = index.to(device=self.rows.device, dtype=torch.int64)
            old = self.rows.index_select(0, index)  # (B, dim)
            new = F.normalize(momentum * old + (1.0 - momentum) * feats.detach().to(old), dim=1)
            self.rows.index_copy_(0, index, new)
