"""Contrastive losses of PIRL (paper eq. 3-5) and of the SimCLR / MoCo v2 baselines, as pure functions of
embeddings and similarities.

Similarities are cosine similarities of L2-normalised vectors: `pos` (B,) scores each sample against its
positive, `neg` (B, K) against its K negatives.
"""

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

# The paper's temperature (section 2.3, taken from Wu et al. 2018 [72]) and loss weight (eq. 5).
PAPER_TAU = 0.07
PAPER_LAMBDA = 0.5


def _check_sims(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"expected pos (B,) and neg (B, K), got {tuple(pos.shape)} and {tuple(neg.shape)}")


def nce_loss(
    pos: torch.Tensor, neg: torch.Tensor, tau: float, log_z: float | torch.Tensor, num_data: int
) -> torch.Tensor:
    """Binary noise-contrastive estimation of Wu et al. 2018 (NPID), the form the PIRL reference trains.

    With P(s) = exp(s / tau) / Z and noise probability Pn = 1 / num_data for each of the K = neg.shape[1]
    negatives, h = P / (P + K * Pn) is the probability that a pair came from the data (paper eq. 3, 4):
        loss = mean_b [ -log h(pos_b) - sum_k log(1 - h(neg_bk)) ].
    Computed in log space: with c = log(K * Pn), log h = -softplus(c - log P) and
    log(1 - h) = -softplus(log P - c), so exp(s / tau) is never formed (it overflows fp32 for tau < ~0.012).
    """
    _check_sims(pos, neg)
    c = math.log(neg.shape[1] / num_data)  # log(K * Pn)
    log_p_pos = pos / tau - log_z  # (B,)
    log_p_neg = neg / tau - log_z  # (B, K)
    return (F.softplus(c - log_p_pos) + F.softplus(log_p_neg - c).sum(dim=1)).mean()


@torch.no_grad()
def estimate_log_z(pos: torch.Tensor, neg: torch.Tensor, tau: float, num_data: int) -> torch.Tensor:
    """log Z with Z = num_data * mean(exp(s / tau)) over all the given similarities (any shapes).

    Wu et al. 2018 estimate Z once, from the first batch, and keep it fixed for the rest of training;
    the caller holds the value (and should checkpoint it). Returns a float32 0-d tensor, computed in log
    space: log Z = log(num_data) + logsumexp(s / tau) - log(count).
    """
    logits = torch.cat([pos.reshape(-1), neg.reshape(-1)]).float() / tau
    return math.log(num_data) + torch.logsumexp(logits, dim=0) - math.log(logits.numel())


def infonce_loss(pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax cross-entropy with the positive in class 0: -log of eq. 3's h in its normalised form.

    The reference implementation's "cross_entropy" loss type (InfoNCE); needs no Z.
    """
    _check_sims(pos, neg)
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / tau  # (B, 1 + K)
    target = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
    return F.cross_entropy(logits, target)


class Negatives(NamedTuple):
    """The negatives' bank rows without a (B, K, D) copy: sample b's k-th negative is table[ids[b, k]].

    table (N, D) in any float dtype (a replicated bank's rows, say); ids (B, K) int64 rows of table, stride 0
    along dim 0 for a batch-shared draw. method: how negative_similarities computes per-sample draws ("auto",
    "dense" or "gather"; see there).
    """

    table: torch.Tensor
    ids: torch.Tensor
    method: str = "auto"


# Per-sample similarities through the dense product query @ table.T (then a gather of the drawn entries) cost
# B*N*D multiply-adds however many negatives are drawn; through row gathers they cost a random row read per
# (sample, negative). Measured on one core (B = 32, K = 32,000, two queries, forward and backward, best of 3):
# N = 4 K: dense 165 ms, gather 301 ms; N = 8 K: 267 vs 309; N = 16 K: 480 vs 370; so the crossover lies near
# N = 10 K and "auto" takes the dense product up to N = 8 K (its (Q, B, N) logits grow with N). Not measured on
# a GPU, where the product is relatively cheaper still.
DENSE_ROWS_PER_NEGATIVE = 8
# Rows gathered per block by the gather method: 8,192 rows of 128 floats (4 MB) ran fastest on the CPU (4,096:
# same, 32,000: 1.6x slower); a GPU takes large blocks (one launch per block).
_CPU_GATHER_BLOCK = 8192
_GPU_GATHER_BLOCK = 2**20


def _gather_block(device: torch.device) -> int:
    return _CPU_GATHER_BLOCK if device.type == "cpu" else _GPU_GATHER_BLOCK


def _blocks(batch: int, num: int, block: int):
    """(b0, b1, k0, k1) tiles of a (batch, num) grid of about `block` cells each: whole rows of samples when
    num < block, else slices of one sample's draws."""
    if num >= block:
        for b in range(batch):
            for k0 in range(0, num, block):
                yield b, b + 1, k0, min(num, k0 + block)
    else:
        per = max(1, block // max(1, num))
        for b0 in range(0, batch, per):
            yield b0, min(batch, b0 + per), 0, num


class _GatherDot(torch.autograd.Function):
    """out[q, b, k] = <table[ids[b, k]], query[q, b]> in float32, blockwise: rows are gathered (and converted to
    float32) one block at a time, for the forward and again for the backward (an embedding bag for a float32
    table), never all B * K at once. No gradient for the table (the bank is updated by its EMA, not by
    gradients). The table is saved for the backward: update the bank after it, as the training loop does."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, ids)
        q_count, batch, _ = query.shape
        out = query.new_empty(q_count, batch, ids.shape[1])
        for b0, b1, k0, k1 in _blocks(batch, ids.shape[1], _gather_block(query.device)):
            rows = table.index_select(0, ids[b0:b1, k0:k1].reshape(-1)).float()  # (nb * nk, D)
            if b1 - b0 == 1:
                out[:, b0, k0:k1] = query[:, b0] @ rows.T  # (Q, D) x (D, nk)
            else:
                rows = rows.view(b1 - b0, k1 - k0, -1)  # (nb, nk, D) x (nb, D, Q) -> (nb, nk, Q)
                out[:, b0:b1, k0:k1] = torch.bmm(rows, query[:, b0:b1].permute(1, 2, 0)).permute(2, 0, 1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, ids = ctx.saved_tensors
        q_count, batch, _ = grad.shape
        if table.dtype == torch.float32:
            # A weighted sum of gathered rows per sample is an embedding bag: one fused pass per query, no block
            # of rows written out (measured 1.8x faster than gather + matmul on the CPU).
            bags = [F.embedding_bag(ids, table, per_sample_weights=grad[q].contiguous(), mode="sum")
                    for q in range(q_count)]
            return torch.stack(bags), None, None
        grad_query = grad.new_zeros(batch, q_count, table.shape[1])
        for b0, b1, k0, k1 in _blocks(batch, ids.shape[1], _gather_block(grad.device)):
            rows = table.index_select(0, ids[b0:b1, k0:k1].reshape(-1)).float()
            if b1 - b0 == 1:
                grad_query[b0] += grad[:, b0, k0:k1] @ rows  # (Q, nk) x (nk, D)
            else:  # (nb, Q, nk) x (nb, nk, D)
                grad_query[b0:b1] += torch.bmm(grad[:, b0:b1, k0:k1].transpose(0, 1), rows.view(b1 - b0, k1 - k0, -1))
        return grad_query.transpose(0, 1), None, None


def negative_similarities(queries: torch.Tensor, bank_neg: "torch.Tensor | Negatives") -> torch.Tensor:
    """(Q, B, K) float32 s(query, m_I') for Q queries (Q, B, D) against each sample's K negatives.

    bank_neg: (B, K, D) rows (stride 0 along dim 0 for a batch-shared draw: one (Q*B, D) x (D, K) product), or
    Negatives(table, ids). For Negatives, a shared draw gathers its K rows once; per-sample draws use
    method "dense": (Q*B, D) x (D, N) over the whole table, then a gather of the drawn entries, exact and
    cheapest while the table is not much larger than K (DENSE_ROWS_PER_NEGATIVE); or "gather": rows gathered
    blockwise, never a (B, K, D) tensor; "auto" picks by N / K. All give the same numbers (to float rounding).
    """
    queries = queries.float()
    q_count, batch, dim = queries.shape
    if isinstance(bank_neg, Negatives):
        table, ids = bank_neg.table, bank_neg.ids
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise ValueError(f"negative ids must be ({batch}, K), got {tuple(ids.shape)}")
        if ids.stride(0) == 0:
            bank_neg = table.index_select(0, ids[0]).float().unsqueeze(0).expand(batch, -1, -1)
        else:
            method = bank_neg.method
            if method == "auto":
                method = "dense" if table.shape[0] <= DENSE_ROWS_PER_NEGATIVE * ids.shape[1] else "gather"
            if method == "dense":
                full = (queries.reshape(q_count * batch, dim) @ table.float().T).view(q_count, batch, -1)
                return full.gather(2, ids.unsqueeze(0).expand(q_count, -1, -1))
            if method == "gather":
                return _GatherDot.apply(queries, table, ids)
            raise ValueError(f"Negatives.method must be 'auto', 'dense' or 'gather', got {method!r}")
    if bank_neg.stride(0) == 0:
        # A batch-shared draw (MemoryBank.draw_negatives(shared=True)): one (Q*B, D) x (D, K) product.
        return (queries.reshape(q_count * batch, dim) @ bank_neg[0].float().T).view(q_count, batch, -1)
    # (B, K, D) x (B, D, Q) -> (B, K, Q): every query in one pass over the rows
    return torch.bmm(bank_neg.float(), queries.permute(1, 2, 0)).permute(2, 0, 1)


def pirl_loss(
    bank_pos: torch.Tensor,
    g_jig: torch.Tensor | None,
    f_img: torch.Tensor | None,
    bank_neg: "torch.Tensor | Negatives",
    lam: float = PAPER_LAMBDA,
    tau: float = PAPER_TAU,
    kind: Literal["nce", "infonce"] = "nce",
    log_z: float | torch.Tensor | None = None,
    num_data: int | None = None,
) -> dict[str, torch.Tensor]:
    """Paper eq. 5: L = lam * L(m_I, g(v_It)) + (1 - lam) * L(m_I, f(v_I)).

    bank_pos (B, D): m_I, each sample's own bank row; g_jig, f_img (B, D): the L2-normalised head outputs;
    bank_neg (B, K, D): the bank rows m_I' of the negatives, or Negatives(table, ids) (MemoryBank.negatives: the
    rows without a (B, K, D) copy; see negative_similarities). In each term the positive scores m_I against
    the second argument and the negatives are scored against that second argument too (eq. 4), so both
    terms share the bank negatives. lam = 0 is NPID++.

    A term whose weight is 0 adds nothing to `loss`: it is still reported (computed without a graph) when
    its embedding is given, and with embedding None its keys are absent (e.g. lam = 0 without patches).
    kind="nce" needs num_data (the dataset size, Pn = 1 / num_data). With log_z=None, log Z is estimated
    from this call's similarities, both terms pooled (the reference estimates it on the first term it
    scores; at initialisation both terms see near-random vectors); pass the returned `log_z` back on later
    steps to keep it fixed, as Wu et al. 2018 do.

    Similarities are computed in fp32 even under autocast: at tau = 0.07 a bf16 rounding of s near 1
    (spacing 2^-8) moves the logit by ~0.06.

    Returns loss; loss_jigsaw and/or loss_image (unweighted terms); log_z (kind="nce"); and, detached,
    the similarities pos_jigsaw (B,), neg_jigsaw (B, K), pos_image, neg_image.
    """
    if kind not in ("nce", "infonce"):
        raise ValueError(f"loss kind must be 'nce' or 'infonce', got {kind!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if kind == "nce" and num_data is None:
        raise ValueError("the 'nce' loss needs num_data (the dataset size) for its noise probability")
    terms = {"jigsaw": (lam, g_jig), "image": (1.0 - lam, f_img)}
    for name, (weight, query) in terms.items():
        if query is None and weight > 0.0:
            raise ValueError(f"the {name} term has weight {weight} > 0 but its embedding is None")
    terms = {name: (w, q) for name, (w, q) in terms.items() if q is not None}
    neg_shape = tuple(bank_neg.ids.shape) + (bank_neg.table.shape[1],) if isinstance(bank_neg, Negatives) \
        else tuple(bank_neg.shape)
    if len(neg_shape) != 3 or bank_pos.dim() != 2 or neg_shape[0] != bank_pos.shape[0]:
        raise ValueError(
            "expected bank_pos (B, D) and bank_neg (B, K, D), "
            f"got {tuple(bank_pos.shape)} and {neg_shape}"
        )

    out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=bank_pos.device.type, enabled=False):
        bank_pos = bank_pos.float()
        # Every term's query against the negatives in one pass (one gather of per-sample rows serves both);
        # a zero-weight term's query is detached and its similarities are reported without a graph.
        grad = torch.is_grad_enabled()
        queries = torch.stack([q.float() if grad and w > 0.0 else q.detach().float() for w, q in terms.values()])
        with torch.set_grad_enabled(grad and any(w > 0.0 for w, _ in terms.values())):
            negs = negative_similarities(queries, bank_neg)  # (Q, B, K)
        sims = {}
        for i, (name, (weight, _)) in enumerate(terms.items()):
            with torch.set_grad_enabled(grad and weight > 0.0):
                pos = (bank_pos * queries[i]).sum(dim=1)  # (B,)
                sims[name] = (pos, negs[i] if grad and weight > 0.0 else negs[i].detach())
        if kind == "nce":
            if log_z is None:
                log_z = estimate_log_z(
                    torch.cat([p for p, _ in sims.values()]),
                    torch.cat([n.reshape(-1) for _, n in sims.values()]),
                    tau,
                    num_data,
                )
            out["log_z"] = torch.as_tensor(log_z, dtype=torch.float32, device=bank_pos.device)
        total = bank_pos.new_zeros(())
        for name, (weight, _) in terms.items():
            pos, neg = sims[name]
            if kind == "nce":
                term = nce_loss(pos, neg, tau, out["log_z"], num_data)
            else:
                term = infonce_loss(pos, neg, tau)
            out[f"loss_{name}"] = term
            out[f"pos_{name}"] = pos.detach()
            out[f"neg_{name}"] = neg.detach()
            if weight > 0.0:
                total = total + weight * term
    out["loss"] = total
    return out


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, all1: torch.Tensor, all2: torch.Tensor, offset: int,
                 tau: float, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1 and algorithm 1) of this process's anchors over the global batch.

    z1, z2 (n, D): this process's two views, L2-normalised; all1, all2 (M, D): every process's (the global batch,
    gathered with gradients; rows offset..offset+n are z1, z2 again); valid (M,) bool: False on rows that only
    pad a process's batch (None: all rows are samples). Each of the 2n anchors scores its twin (the positive)
    against the other 2N - 2 views of the N samples, never itself; the loss is the mean over the 2n anchors, so
    the processes' losses weighted by n / N give the loss of one process holding the whole batch (offset 0).

    Returns loss; and per anchor, detached: pos (2n,) the cosine similarity to the twin, accuracy (2n,) 1.0 where
    the twin scores highest of the 2N - 1 candidates. Computed in float32 even under autocast (as pirl_loss).
    """
    n, m = z1.shape[0], all1.shape[0]
    if z2.shape != z1.shape or all1.dim() != 2 or all2.shape != all1.shape or all1.shape[1] != z1.shape[1]:
        raise ValueError(f"expected z1, z2 (n, D) and all1, all2 (M, D), got {tuple(z1.shape)}, {tuple(z2.shape)}, "
                         f"{tuple(all1.shape)}, {tuple(all2.shape)}")
    if not 0 <= offset <= m - n:
        raise ValueError(f"the local rows {offset}..{offset + n} do not fit the {m} gathered rows")
    if valid is not None and valid.shape != (m,):
        raise ValueError(f"valid must be ({m},), got {tuple(valid.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        anchors = torch.cat([z1, z2]).float()  # (2n, D): view 1's anchors, then view 2's
        candidates = torch.cat([all1, all2]).float()  # (2M, D)
        sims = anchors @ candidates.T  # (2n, 2M)
        rows = torch.arange(n, device=z1.device) + offset
        own = torch.cat([rows, rows + m])  # (2n,) each anchor's own column
        twin = torch.cat([rows + m, rows])  # (2n,) its positive: the same sample's other view
        excluded = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, own.unsqueeze(1), True)
        if valid is not None:
            excluded |= ~torch.cat([valid, valid]).unsqueeze(0)
        logits = (sims / tau).masked_fill(excluded, float("-inf"))
        loss = F.cross_entropy(logits, twin)
        return {"loss": loss, "pos": sims.detach().gather(1, twin.unsqueeze(1)).squeeze(1),
                "accuracy": (logits.detach().argmax(dim=1) == twin).float()}


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """MoCo's InfoNCE (He et al. 2020, eq. 1; v2's temperature 0.2): logits [q.k+, q.queue] / tau, target 0.

    q (B, D) the queries, k (B, D) their keys (the positives; no gradient flows into them), queue (K, D) the keys
    of earlier steps (the negatives), all L2-normalised. Returns loss; and detached: pos (B,) q.k+, neg (B, K)
    q.queue, accuracy (B,) 1.0 where the positive outscores every queued key. Float32 even under autocast.
    """
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"expected q, k (B, D) and queue (K, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.float()
        pos = (q * k.detach().float()).sum(dim=1)  # (B,)
        neg = q @ queue.detach().float().T  # (B, K)
        loss = infonce_loss(pos, neg, tau)
        return {"loss": loss, "pos": pos.detach(), "neg": neg.detach(),
                "accuracy": (pos.detach() > neg.detach().max(dim=1).values).float()}
