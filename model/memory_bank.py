"""The memory bank M of PIRL (paper section 2.2): one L2-normalised embedding m_I per training image.

Two kinds of draws of negatives, both without host synchronisation (no .item(), no data-dependent shapes):
- generator draws (`generator=`, or the global RNG): a per-rank stream, as the reference implementation;
- counter draws (`seed=` and `step=`): draw k of the sample with global index i is a hash of (seed, step, i, k),
  so it depends neither on the rank nor on which other samples share the batch: 2 processes with batch B and
  1 process with batch 2B draw the same negatives for the same sample. The hash is common/rng.py's
  counter_uniform (32-bit words from int64 tensor ops, the same bits on every device).
The bank (model/sharded_bank.py holds the sharded one) stores its rows in float32, bfloat16 or float16.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from pirl_trainer.model.losses import Negatives
from pirl_trainer.common.rng import (PURPOSE_BANK_INIT, PURPOSE_NEGATIVES, PURPOSE_SHARED_NEGATIVES, counter_words,
                          derive_seed)

BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One 32-bit word maps onto n values with relative bias <= n / 2**32 between values (multiply-shift); above
# 2**24 values (0.4 %) a draw takes two words (bias n / 2**64).
_ONE_WORD_MAX = 2**24
# Counter hashing on the CPU: chunks of ~32k words (256 KB of int64 per temporary) stay in the L2 cache; one
# chunk of 2M words took 2.3x longer (tools/profile.py bank, 64 x 32,000 draws, one core). One chunk on a GPU.
_CPU_HASH_CHUNK = 2**15


def negatives_key(seed: int, step: int, shared: bool = False) -> int:
    """The key of one step's counter draws (a derive_seed value): a host computation, no device work."""
    return derive_seed(PURPOSE_SHARED_NEGATIVES if shared else PURPOSE_NEGATIVES, seed, step)


def bounded(words: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """Uniform ints in [0, n) from 32-bit words (..., w), w = 1 or 2, by multiply-shift: floor(u * n) with u the
    words read as a binary fraction. n < 2**31 (an int or an int64 tensor broadcasting against words[..., 0])."""
    out = (words[..., 0] * n) >> 32
    if words.shape[-1] == 2:  # floor((h0 * 2**32 + h1) * n / 2**64), exactly, in int64
        out = (words[..., 0] * n + ((words[..., 1] * n) >> 32)) >> 32
    return out


def _words_per_draw(n: int) -> int:
    if n >= 2**31:
        raise ValueError(f"counter draws support fewer than 2**31 rows, got {n}")
    return 1 if n <= _ONE_WORD_MAX else 2


def _hash_rows_per_chunk(index: torch.Tensor, words: int) -> int:
    if index.device.type != "cpu":
        return max(1, index.shape[0])
    return max(1, _CPU_HASH_CHUNK // max(1, words))


def draw_per_sample(
    num_rows: int,
    index: torch.Tensor,
    num: int,
    *,
    generator: torch.Generator | None = None,
    key: int | None = None,
) -> torch.Tensor:
    """(B, num) int64: for each sample, `num` rows uniform over {0..num_rows-1} without its own row index[b].

    key=None: torch.randint on index's device (generator, or the global RNG). key given: counter draws, draw k of
    sample index[b] a function of (key, index[b], k) only. With replacement, as the reference samplers.
    """
    n = num_rows - 1  # draw from the n other rows and skip over `own`
    if key is None:
        draw = torch.randint(0, n, (index.shape[0], num), generator=generator, device=index.device)
    else:
        w = _words_per_draw(n)
        step = _hash_rows_per_chunk(index, num * w)
        draw = torch.cat([
            bounded(counter_words(key, index[s:s + step], num * w).view(-1, num, w), n)
            for s in range(0, index.shape[0], step)
        ]) if index.shape[0] else index.new_empty(0, num)
    return draw + (draw >= index.unsqueeze(1)).long()


def draw_shared(
    num_rows: int,
    exclude: torch.Tensor,
    num: int,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    key: int | None = None,
) -> torch.Tensor:
    """One draw of `num` rows uniform over the rows not in `exclude`, as an expanded (batch, num) view.

    exclude (E,): any order, duplicates allowed, entries outside [0, num_rows) (e.g. -1 padding) ignored. Fixed
    shapes only: the number of excluded rows stays on the device (no torch.unique, which syncs).
    """
    device = exclude.device
    # Sorted, invalid entries last (as num_rows); keep marks the first copy of each valid row.
    e = torch.where((exclude >= 0) & (exclude < num_rows), exclude, num_rows)
    e = torch.sort(e).values
    first = torch.ones_like(e, dtype=torch.bool)
    first[1:] = e[1:] != e[:-1]
    keep = (e < num_rows) & first
    kept_through = torch.cumsum(keep, 0)  # (E,): kept rows among e[0..j]
    # The r-th allowed row is r + #{kept rows <= it}. A kept row e_j has e_j - (kept_through_j - 1) allowed rows
    # below it; duplicates repeat their row's value and invalid entries get num_rows, so the sequence stays
    # non-decreasing and searchsorted finds how many entries lie at or below; kept_before counts the kept ones.
    below = torch.where(e < num_rows, e - (kept_through - 1), num_rows)
    kept_before = torch.cat([kept_through.new_zeros(1), kept_through])
    allowed = num_rows - kept_through[-1:] if e.numel() else torch.full((1,), num_rows, device=device)
    if key is None:
        u = torch.rand(num, dtype=torch.float64, generator=generator, device=device)
        r = torch.minimum((u * allowed).long(), allowed - 1)  # u < 1; the min guards the rounding of u * allowed
    else:
        w = _words_per_draw(num_rows)
        r = bounded(counter_words(key, torch.zeros(1, dtype=torch.int64, device=device), num * w).view(num, w),
                    allowed)
    row_ids = r + kept_before[torch.searchsorted(below, r, right=True)]  # (num,)
    return row_ids.unsqueeze(0).expand(batch, num)  # a view: every sample gets the same draw


def check_num_negatives(num: int, num_rows: int, excluded: torch.Tensor | None = None) -> None:
    """Raise unless `num` >= 1 negatives fit in the rows outside `excluded` (None: one row per sample).

    With `excluded`, the host-side bound num_rows - len(excluded) decides without looking at the data; only
    when it fails (a bank barely larger than the batch, never in training) are the distinct rows counted,
    which syncs.
    """
    if num < 1:
        raise ValueError(f"number of negatives must be >= 1, got {num}")
    if excluded is None:
        available, what = num_rows - 1, "each sample's own row"
    elif num <= num_rows - excluded.numel():
        return
    else:
        valid = excluded[(excluded >= 0) & (excluded < num_rows)]
        distinct = torch.unique(valid).numel()
        available, what = num_rows - distinct, f"the batch's {distinct} rows"
    if num > available:
        raise ValueError(
            f"asked for {num} negatives but the bank has only {available} rows outside {what} "
            f"({num_rows} rows in all): lower the number of negatives"
        )


def draw_negatives(
    num_rows: int,
    index: torch.Tensor,
    num: int,
    shared: bool,
    generator: torch.Generator | None,
    seed: int | None,
    step: int | None,
    exclude: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """MemoryBank.draw_negatives for any bank of `num_rows` rows living on `device`."""
    with record_function("bank_draw"):
        if index.dim() != 1:
            raise ValueError(f"index must be (B,), got shape {tuple(index.shape)}")
        if (seed is None) != (step is None):
            raise ValueError("counter draws need both seed= and step=")
        if seed is not None and generator is not None:
            raise ValueError("give either generator= or seed= and step=, not both")
        key = None if seed is None else negatives_key(seed, step, shared)
        index = index.to(device=device, dtype=torch.int64)
        if shared:
            exclude = index if exclude is None else exclude.to(device=device, dtype=torch.int64).reshape(-1)
            check_num_negatives(num, num_rows, exclude)
            return draw_shared(num_rows, exclude, num, index.shape[0], generator=generator, key=key)
        check_num_negatives(num, num_rows)
        return draw_per_sample(num_rows, index, num, generator=generator, key=key)


def counter_unit_rows(seed: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """(len(rows), dim) float32 unit vectors, row i a function of (seed, i) only: uniform on the sphere.

    Normalised Gaussians from Box-Muller on counter words, so a bank of any size starts the same whatever the
    number of processes holding it (model/sharded_bank.py) and a replicated bank can start identically.
    """
    key = derive_seed(PURPOSE_BANK_INIT, seed)
    half = (dim + 1) // 2
    out = []
    step = _hash_rows_per_chunk(rows, 2 * half)
    for s in range(0, rows.shape[0], step):
        words = counter_words(key, rows[s:s + step], 2 * half).to(torch.float64)
        u1 = (words[:, :half] + 0.5) / 2.0**32  # in (0, 1): the log is finite
        u2 = words[:, half:] / 2.0**32
        radius = torch.sqrt(-2.0 * torch.log(u1))
        gauss = torch.cat([radius * torch.cos(2 * math.pi * u2), radius * torch.sin(2 * math.pi * u2)], dim=1)
        out.append(F.normalize(gauss[:, :dim].float(), dim=1))
    return torch.cat(out) if out else torch.empty(0, dim, device=rows.device)


def check_bank_dtype(dtype: torch.dtype) -> None:
    if dtype not in BANK_DTYPES:
        raise ValueError(f"bank dtype must be one of {', '.join(map(str, BANK_DTYPES))}, got {dtype}")


def ema_rows(old: torch.Tensor, feats: torch.Tensor, momentum: float) -> torch.Tensor:
    """normalise(momentum * old + (1 - momentum) * feats) in float32, whatever the storage dtype."""
    return F.normalize(momentum * old.float() + (1.0 - momentum) * feats.detach().float(), dim=1)


def check_update(index: torch.Tensor, feats: torch.Tensor, dim: int, momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if index.dim() != 1 or feats.shape != (index.shape[0], dim):
        raise ValueError(f"feats must be ({index.shape[0]}, {dim}), got {tuple(feats.shape)}")


def broadcast_source(rows: torch.Tensor) -> torch.Tensor:
    """rows without its broadcast dims (stride 0, e.g. a batch-shared draw): every slice holds the same ids."""
    source = rows
    for d in range(rows.dim()):
        if rows.stride(d) == 0 and rows.shape[d] > 1:
            source = source.narrow(d, 0, 1)
    return source


class MemoryBank(nn.Module):
    """A replicated bank of `num_rows` unit vectors of size `dim`, row i belonging to dataset index i.

    The interface is three calls (draw_negatives, fetch, update) over global row ids, plus `negatives` (fetch
    for the loss, without a (B, K, dim) copy); model/sharded_bank.py implements the same calls over a bank split
    across ranks, with the same state_dict, so a checkpoint of either resumes as either, on any process count.

    `rows` is a registered buffer (it moves with `.to(device)` and is saved in the state_dict) of dtype
    float32 (default), bfloat16 or float16: half-precision storage halves the bank's memory; the EMA update is
    computed in float32 and rounded once when stored, and fetch returns float32 (the loss computes in float32:
    converting the gathered rows there keeps a batch-shared draw a view).
    Initial rows: init_seed=None draws them from the *global* torch RNG (seed torch before building the bank);
    init_seed=s makes row i a function of (s, i) (counter_unit_rows), the same as a sharded bank's.

    Negatives per sample: the paper uses N = 32,000 for its ImageNet models and 4,096 for the 400-epoch
    ablations of section 4 (supplement A).
    """

    rows: torch.Tensor

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype = torch.float32, init_seed: int | None = None):
        super().__init__()
        if num_rows < 2:
            raise ValueError(f"a memory bank needs at least 2 rows to have negatives, got {num_rows}")
        check_bank_dtype(dtype)
        if init_seed is None:
            rows = F.normalize(torch.randn(num_rows, dim), dim=1)  # normalised Gaussians: uniform on the sphere
        else:
            rows = counter_unit_rows(init_seed, torch.arange(num_rows), dim)
        self.register_buffer("rows", rows.to(dtype))

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held by this process."""
        return self.rows.numel() * self.rows.element_size()

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
        """(B, num) int64 row ids of negatives for the samples whose own rows are `index` (B,).

        shared=False: each sample draws its own `num` rows uniformly from D minus its own row (the paper's
        D_N subset of D without I, section 2.1). Draws are with replacement, as in the reference samplers.
        shared=True: one draw of `num` rows for the whole batch, uniform over the rows outside `exclude` (default:
        index), returned as an expanded view (B, num) of that one draw: one gather of num rows per batch instead
        of B * num (PIRL.md, cost arithmetic).

        Randomness: `generator` (or the global RNG) as before; or seed= and step=: counter draws, a function of
        (seed, step, index[b], k) per sample, and of (seed, step, the set `exclude`) for a shared draw. Pass the
        GLOBAL batch's indexes (all ranks', gathered; -1 padding is ignored) as `exclude` so that every rank and
        any process count draw the same shared negatives. No host synchronisation either way (a generator must
        live on the bank's device); pass `index` on the bank's device to avoid a blocking copy.
        """
        return draw_negatives(self.num_rows, index, num, shared, generator, seed, step, exclude, self.rows.device)

    def fetch(self, rows: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The vectors of `rows` (int64, any shape) -> rows.shape + (dim,), in `dtype` (None: the bank's).

        A batch-shared draw (an expanded view, stride 0 along some dims) is gathered once and expanded
        back, so fetching it reads num rows, not B * num.
        """
        with record_function("bank_gather"):
            source = broadcast_source(rows)
            ids = source.reshape(-1).to(device=self.rows.device, dtype=torch.int64)
            vectors = self.rows.index_select(0, ids)
            if dtype is not None:
                vectors = vectors.to(dtype)
            return vectors.view(*source.shape, self.dim).expand(*rows.shape, self.dim)

    def negatives(self, neg_rows: torch.Tensor) -> torch.Tensor | Negatives:
        """The negatives for pirl_loss: a shared draw gathered once ((B, K, dim) expanded view, float32); per-sample
        draws as Negatives(rows, neg_rows), no copy: the loss computes their similarities without a (B, K, dim)
        tensor (model/losses.py, negative_similarities)."""
        if neg_rows.dim() == 2 and neg_rows.stride(0) == 0:
            return self.fetch(neg_rows)
        return Negatives(self.rows, neg_rows.to(device=self.rows.device, dtype=torch.int64))

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, momentum: float = 0.5) -> None:
        """rows[index] <- normalise(momentum * rows[index] + (1 - momentum) * feats); feats (B, dim).

        momentum 0.5 is the paper's weight for the exponential moving average (section 2.3, after [72]). The
        EMA is computed in float32 and stored in the bank's dtype. No gradient flows into the bank. Entries with
        index -1 (padding, e.g. of uneven last batches gathered across ranks) are ignored, with fixed shapes:
        no boolean mask, no host synchronisation. An index repeated within one call: every copy is computed from
        the same old row and one of them is stored, which one unspecified (index_copy_ semantics). Loaders
        yield each index at most once per batch, so this does not arise in training.
        """
        with record_function("bank_update_rows"):
            check_update(index, feats, self.dim, momentum)
            index = index.to(device=self.rows.device, dtype=torch.int64)
            valid = index >= 0
            # Padding entries write the value of the first valid entry to its row (equal duplicates: a no-op);
            # with no valid entry at all, row 0's own value back to row 0.
            # (Indexing with a 0-d tensor would read it on the host: 1-element index_select instead.)
            first = torch.argmax(valid.to(torch.uint8)).view(1)
            target = torch.where(valid, index, index.index_select(0, first).clamp(min=0))
            old = self.rows.index_select(0, target)  # (B, dim)
            new = ema_rows(old, feats, momentum)
            fill = torch.where(valid.index_select(0, first).unsqueeze(1), new.index_select(0, first),
                               old.index_select(0, first).float())  # (1, dim)
            new = torch.where(valid.unsqueeze(1), new, fill)
            self.rows.index_copy_(0, target, new.to(self.rows.dtype))
