import math

import pytest
import torch
import torch.nn.functional as F

from pirl_trainer.model.losses import estimate_log_z, infonce_loss, nce_loss, pirl_loss


def _naive_nce(pos, neg, tau, log_z, num_data):
    """NPID's NCECriterion written with probabilities, in float64 (no eps)."""
    pos, neg = pos.double(), neg.double()
    k = neg.shape[1]
    p_pos = torch.exp(pos / tau - log_z)
    p_neg = torch.exp(neg / tau - log_z)
    kpn = k / num_data
    return (-torch.log(p_pos / (p_pos + kpn)) - torch.log(kpn / (p_neg + kpn)).sum(1)).mean()


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nce_known_value_symmetric_case():
    # P = exp(0/1) / 2 = 1/2 and K * Pn = 1 * 1/2 = 1/2, so h(pos) = 1/2 and 1 - h(neg) = 1/2:
    # loss = -log(1/2) - log(1/2) = 2 log 2.
    loss = nce_loss(torch.tensor([0.0]), torch.tensor([[0.0]]), tau=1.0, log_z=math.log(2), num_data=2)
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2)))


def test_nce_known_value_asymmetric_case():
    # tau = 0.5, Z = 1, num_data = 4, K = 2: K * Pn = 1/2.
    # pos = 1: P = e^2, h = e^2 / (e^2 + 1/2).  neg = 0: P = 1, 1 - h = (1/2) / (3/2) = 1/3, twice.
    expected = -math.log(math.exp(2) / (math.exp(2) + 0.5)) + 2 * math.log(3)
    loss = nce_loss(torch.tensor([1.0]), torch.tensor([[0.0, 0.0]]), tau=0.5, log_z=0.0, num_data=4)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_nce_matches_probability_form_and_batch_mean():
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(6, generator=gen) * 2 - 1
    neg = torch.rand(6, 10, generator=gen) * 2 - 1
    loss = nce_loss(pos, neg, tau=0.2, log_z=torch.tensor(3.0), num_data=50)
    # fp32 against an fp64 reference
    torch.testing.assert_close(loss.double(), _naive_nce(pos, neg, 0.2, 3.0, 50), rtol=1e-5, atol=1e-6)


def test_nce_stable_at_paper_temperature_with_similarities_near_one():
    pos = torch.full((4,), 0.9999, requires_grad=True)
    neg = torch.full((4, 4096), 0.999, requires_grad=True)
    num_data = 1_281_167  # ImageNet train
    log_z = estimate_log_z(pos, neg, 0.07, num_data)
    loss = nce_loss(pos, neg, tau=0.07, log_z=log_z, num_data=num_data)
    expected = _naive_nce(pos.detach(), neg.detach(), 0.07, log_z.double(), num_data)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()


def test_nce_finite_where_exp_overflows():
    pos = torch.ones(2, requires_grad=True)
    neg = torch.ones(2, 3, requires_grad=True)
    assert torch.isinf(torch.exp(pos.detach() / 0.01)).all()  # a probability-space version would give nan
    loss = nce_loss(pos, neg, tau=0.01, log_z=0.0, num_data=100)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()


def test_nce_gradient_directions():
    pos = torch.zeros(3, requires_grad=True)
    neg = torch.zeros(3, 5, requires_grad=True)
    nce_loss(pos, neg, tau=0.1, log_z=1.0, num_data=20).backward()
    assert (pos.grad < 0).all() and (neg.grad > 0).all()


def test_estimate_log_z_known_value():
    # tau = 1: exp(s) over {0, 0, 0, log 3} = {1, 1, 1, 3}, mean 1.5; Z = 10 * 1.5 = 15.
    pos = torch.tensor([0.0, 0.0])
    neg = torch.tensor([[0.0], [math.log(3)]])
    log_z = estimate_log_z(pos, neg, tau=1.0, num_data=10)
    assert log_z.shape == () and log_z.dtype == torch.float32 and not log_z.requires_grad
    torch.testing.assert_close(log_z, torch.tensor(math.log(15)))


def test_estimate_log_z_stable_at_paper_temperature():
    pos = torch.ones(4)
    neg = torch.ones(4, 8)
    log_z = estimate_log_z(pos, neg, tau=0.01, num_data=1000)  # exp(100) overflows fp32
    torch.testing.assert_close(log_z, torch.tensor(100 + math.log(1000)))


def test_infonce_one_negative_is_softplus():
    pos = torch.tensor([0.3, -0.2])
    neg = torch.tensor([[0.1], [0.5]])
    expected = F.softplus((neg[:, 0] - pos) / 0.07).mean()
    torch.testing.assert_close(infonce_loss(pos, neg, tau=0.07), expected)


def test_infonce_equal_scores_give_log_k_plus_one():
    loss = infonce_loss(torch.full((3,), 0.5), torch.full((3, 7), 0.5), tau=0.07)
    torch.testing.assert_close(loss, torch.tensor(math.log(8)))


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"pos \(B,\)"):
        nce_loss(torch.zeros(2), torch.zeros(3, 4), 0.07, 0.0, 10)
    with pytest.raises(ValueError, match=r"pos \(B,\)"):
        infonce_loss(torch.zeros(2, 1), torch.zeros(2, 4), 0.07)


B, K, D, N = 4, 6, 8, 100


def _pirl_inputs():
    return _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, D, seed=3), _unit(B, K, D, seed=4)


@pytest.mark.parametrize("kind", ["nce", "infonce"])
def test_pirl_loss_terms_and_combination(kind):
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    out = pirl_loss(bank_pos, g_jig, f_img, bank_neg, lam=0.3, tau=0.07, kind=kind, log_z=2.0, num_data=N)

    # Eq. 4 per term: the positive pairs m_I with the head output; the negatives are scored against
    # the head output too.
    for name, q in (("jigsaw", g_jig), ("image", f_img)):
        pos = torch.einsum("bd,bd->b", bank_pos, q)
        neg = torch.einsum("bd,bkd->bk", q, bank_neg)
        torch.testing.assert_close(out[f"pos_{name}"], pos)
        torch.testing.assert_close(out[f"neg_{name}"], neg)
        expected = nce_loss(pos, neg, 0.07, 2.0, N) if kind == "nce" else infonce_loss(pos, neg, 0.07)
        torch.testing.assert_close(out[f"loss_{name}"], expected)
    torch.testing.assert_close(out["loss"], 0.3 * out["loss_jigsaw"] + 0.7 * out["loss_image"])
    assert ("log_z" in out) == (kind == "nce")


def test_pirl_loss_lambda_zero_is_npid_pp_without_jigsaw():
    bank_pos, _, f_img, bank_neg = _pirl_inputs()
    out = pirl_loss(bank_pos, None, f_img, bank_neg, lam=0.0, kind="infonce")
    assert "loss_jigsaw" not in out
    torch.testing.assert_close(out["loss"], out["loss_image"])


def test_pirl_loss_zero_weight_term_is_reported_without_graph():
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    g_jig.requires_grad_(True)
    f_img.requires_grad_(True)
    out = pirl_loss(bank_pos, g_jig, f_img, bank_neg, lam=0.0, kind="nce", log_z=1.0, num_data=N)
    pos = torch.einsum("bd,bd->b", bank_pos, g_jig.detach())
    neg = torch.einsum("bd,bkd->bk", g_jig.detach(), bank_neg)
    torch.testing.assert_close(out["loss_jigsaw"], nce_loss(pos, neg, 0.07, 1.0, N))
    assert not out["loss_jigsaw"].requires_grad
    torch.testing.assert_close(out["loss"], out["loss_image"])
    out["loss"].backward()
    assert g_jig.grad is None


def test_pirl_loss_estimates_log_z_and_reuses_it():
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    first = pirl_loss(bank_pos, g_jig, f_img, bank_neg, num_data=N)
    pooled_pos = torch.cat([first["pos_jigsaw"], first["pos_image"]])
    pooled_neg = torch.cat([first["neg_jigsaw"], first["neg_image"]])
    torch.testing.assert_close(first["log_z"], estimate_log_z(pooled_pos, pooled_neg, 0.07, N))
    again = pirl_loss(bank_pos, g_jig, f_img, bank_neg, num_data=N, log_z=first["log_z"])
    torch.testing.assert_close(again["loss"], first["loss"])


def test_pirl_loss_shared_negatives_match_materialised():
    bank_pos, g_jig, f_img, _ = _pirl_inputs()
    shared = _unit(1, K, D, seed=5).expand(B, K, D)
    a = pirl_loss(bank_pos, g_jig, f_img, shared, log_z=1.0, num_data=N)
    b = pirl_loss(bank_pos, g_jig, f_img, shared.contiguous(), log_z=1.0, num_data=N)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_pirl_loss_gradients_reach_both_heads_only():
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    g_jig.requires_grad_(True)
    f_img.requires_grad_(True)
    out = pirl_loss(bank_pos, g_jig, f_img, bank_neg, num_data=N)
    out["loss"].backward()
    assert torch.isfinite(g_jig.grad).all() and g_jig.grad.abs().sum() > 0
    assert torch.isfinite(f_img.grad).all() and f_img.grad.abs().sum() > 0
    assert bank_pos.grad is None and bank_neg.grad is None


def test_pirl_loss_fp32_under_low_precision_inputs():
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    out = pirl_loss(bank_pos, g_jig.bfloat16(), f_img.bfloat16(), bank_neg, num_data=N)
    assert out["loss"].dtype == torch.float32


def test_pirl_loss_argument_errors():
    bank_pos, g_jig, f_img, bank_neg = _pirl_inputs()
    with pytest.raises(ValueError, match="num_data"):
        pirl_loss(bank_pos, g_jig, f_img, bank_neg)
    with pytest.raises(ValueError, match="'nce' or 'infonce'"):
        pirl_loss(bank_pos, g_jig, f_img, bank_neg, kind="xent")
    with pytest.raises(ValueError, match="lambda"):
        pirl_loss(bank_pos, g_jig, f_img, bank_neg, lam=1.5, kind="infonce")
    with pytest.raises(ValueError, match="jigsaw term"):
        pirl_loss(bank_pos, None, f_img, bank_neg, kind="infonce")
    with pytest.raises(ValueError, match=r"bank_neg \(B, K, D\)"):
        pirl_loss(bank_pos, g_jig, f_img, bank_neg[0], kind="infonce")
