"""Contrastive losses of PIRL (paper eq. 3-5), as pure functions of embeddings and similarities.

Similarities are cosine similarities of L2-normalised vectors: `pos` (B,) scores each sample against its
positive, `neg` (B, K) against its K negatives.
"""

import math
from typing import Literal

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


def _similarities(
    query: torch.Tensor, bank_pos: torch.Tensor, bank_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B,) = s(m_I, query), neg (B, K) = s(query, m_I'); all inputs unit vectors."""
    pos = (bank_pos * query).sum(dim=1)
    if bank_neg.stride(0) == 0:
        # A batch-shared draw (MemoryBank.draw_negatives(shared=True)): one (B, D) x (D, K) product.
        neg = query @ bank_neg[0].T
    else:
        neg = torch.bmm(bank_neg, query.unsqueeze(2)).squeeze(2)  # (B, K, D) x (B, D, 1) -> (B, K)
    return pos, neg


def pirl_loss(
    bank_pos: torch.Tensor,
    g_jig: torch.Tensor | None,
    f_img: torch.Tensor | None,
    bank_neg: torch.Tensor,
    lam: float = PAPER_LAMBDA,
    tau: float = PAPER_TAU,
    kind: Literal["nce", "infonce"] = "nce",
    log_z: float | torch.Tensor | None = None,
    num_data: int | None = None,
) -> dict[str, torch.Tensor]:
    """Paper eq. 5: L = lam * L(m_I, g(v_It)) + (1 - lam) * L(m_I, f(v_I)).

    bank_pos (B, D): m_I, each sample's own bank row; g_jig, f_img (B, D): the L2-normalised head outputs;
    bank_neg (B, K, D): the bank rows m_I' of the negatives. In each term the positive scores m_I against
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
    if bank_neg.dim() != 3 or bank_pos.dim() != 2 or bank_neg.shape[0] != bank_pos.shape[0]:
        raise ValueError(
            "expected bank_pos (B, D) and bank_neg (B, K, D), "
            f"got {tuple(bank_pos.shape)} and {tuple(bank_neg.shape)}"
        )

    out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=bank_pos.device.type, enabled=False):
        bank_pos, bank_neg = bank_pos.float(), bank_neg.float()
        sims = {}
        for name, (weight, query) in terms.items():
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0.0):
                sims[name] = _similarities(query.float(), bank_pos, bank_neg)
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
