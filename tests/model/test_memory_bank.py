import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pirl_trainer.model.losses import Negatives, nce_loss, negative_similarities, pirl_loss
from pirl_trainer.model.memory_bank import (
    MemoryBank, bounded, counter_unit_rows, counter_words, draw_per_sample, draw_shared, negatives_key,
)
from pirl_trainer.common.rng import counter_uniform


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops: while another process holds a core of the shared 2-core machine, 2 intra-op threads ran
    the expected-loss test 17x slower than 1 (9.8 s against 0.6 s)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / counts.numel()
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def test_rows_are_unit_norm_buffer_in_state_dict():
    bank = MemoryBank(50, 8)
    assert bank.rows.shape == (50, 8) and (bank.num_rows, bank.dim) == (50, 8)
    torch.testing.assert_close(bank.rows.norm(dim=1), torch.ones(50))
    assert "rows" in dict(bank.named_buffers())
    assert torch.equal(bank.state_dict()["rows"], bank.rows)
    assert not list(bank.parameters())


def test_init_follows_global_seed():
    torch.manual_seed(1)
    a = MemoryBank(10, 4).rows
    torch.manual_seed(1)
    b = MemoryBank(10, 4).rows
    assert torch.equal(a, b)


def test_state_dict_round_trip():
    src, dst = MemoryBank(10, 4), MemoryBank(10, 4)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src.rows, dst.rows)


def test_per_sample_draw_never_returns_own_row():
    bank = MemoryBank(10, 4)
    index = torch.arange(10).repeat(200)  # (2000,): each row 200 times
    ids = bank.draw_negatives(index, 9, generator=_gen())
    assert ids.shape == (2000, 9) and ids.dtype == torch.int64
    assert (ids != index[:, None]).all()
    assert ids.min() >= 0 and ids.max() < 10
    # Every other row does come up.
    for b in range(10):
        assert set(ids[index == b].reshape(-1).tolist()) == set(range(10)) - {b}


def test_per_sample_draw_is_uniform():
    bank = MemoryBank(8, 4)
    ids = bank.draw_negatives(torch.full((10_000,), 3), 7, generator=_gen())  # 70,000 draws
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    assert counts[3] == 0
    # 7 cells, 6 degrees of freedom: P(chi2 > 30) ~ 4e-5; the generator is fixed, so it cannot flake.
    assert _chi_square(torch.cat([counts[:3], counts[4:]])) < 30


def test_draws_reproducible_with_generator():
    bank = MemoryBank(100, 4)
    index = torch.tensor([0, 5, 99])
    for shared in (False, True):
        a = bank.draw_negatives(index, 20, shared=shared, generator=_gen(2))
        b = bank.draw_negatives(index, 20, shared=shared, generator=_gen(2))
        assert torch.equal(a, b)


def test_shared_draw_excludes_batch_rows_and_is_a_view():
    bank = MemoryBank(10, 4)
    index = torch.tensor([9, 2, 0, 3, 2])  # unsorted, with a duplicate
    ids = bank.draw_negatives(index, 6, shared=True, generator=_gen())
    assert ids.shape == (5, 6)
    assert ids.stride(0) == 0  # expanded, not copied
    gen = _gen()
    draws = torch.cat([bank.draw_negatives(index, 6, shared=True, generator=gen)[0] for _ in range(500)])
    assert set(draws.tolist()) == {1, 4, 5, 6, 7, 8}
    counts = torch.bincount(draws, minlength=10)[[1, 4, 5, 6, 7, 8]]
    assert _chi_square(counts) < 30  # 5 dof: P(chi2 > 30) ~ 1.5e-5


def test_too_many_negatives_raise():
    bank = MemoryBank(10, 4)
    bank.draw_negatives(torch.tensor([0]), 9)  # exactly the 9 other rows is allowed
    with pytest.raises(ValueError, match="only 9 rows"):
        bank.draw_negatives(torch.tensor([0]), 10)
    with pytest.raises(ValueError, match="only 7 rows"):
        bank.draw_negatives(torch.tensor([0, 1, 2]), 8, shared=True)
    with pytest.raises(ValueError, match=">= 1"):
        bank.draw_negatives(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bank.draw_negatives(torch.tensor([[0]]), 1)


def test_fetch_shapes_and_values():
    bank = MemoryBank(20, 6)
    ids = torch.randint(0, 20, (2, 3, 4), generator=_gen())
    out = bank.fetch(ids)
    assert out.shape == (2, 3, 4, 6)
    assert torch.equal(out, bank.rows[ids])


def test_fetch_of_shared_draw_gathers_once_and_matches():
    bank = MemoryBank(20, 6)
    ids = bank.draw_negatives(torch.tensor([1, 2, 3]), 7, shared=True, generator=_gen())
    out = bank.fetch(ids)
    assert out.shape == (3, 7, 6)
    assert out.stride(0) == 0
    assert torch.equal(out, bank.rows[ids.contiguous()])


def test_update_known_value():
    bank = MemoryBank(3, 2)
    bank.rows.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    bank.update(torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [0.0, -3.0]]))
    r = 1 / math.sqrt(2)
    # row 0: normalise(0.5*[1,0] + 0.5*[0,1]); row 2: normalise(0.5*[-1,0] + 0.5*[0,-3]) = [-1,-3]/sqrt(10)
    expected = torch.tensor([[r, r], [0.0, 1.0], [-1 / math.sqrt(10), -3 / math.sqrt(10)]])
    torch.testing.assert_close(bank.rows, expected)


def test_update_momentum_and_norms():
    bank = MemoryBank(100, 16)
    before = bank.rows.clone()
    index = torch.tensor([4, 50, 7])
    feats = torch.randn(3, 16, requires_grad=True)
    bank.update(index, feats, momentum=0.9)
    torch.testing.assert_close(bank.rows.norm(dim=1), torch.ones(100))
    expected = torch.nn.functional.normalize(0.9 * before[index] + 0.1 * feats.detach(), dim=1)
    torch.testing.assert_close(bank.rows[index], expected)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(bank.rows[untouched], before[untouched])
    assert not bank.rows.requires_grad


def test_update_with_duplicate_index_stores_one_of_the_updates():
    bank = MemoryBank(5, 2)
    bank.rows.copy_(torch.tensor([[1.0, 0.0]]).expand(5, 2))
    bank.update(torch.tensor([1, 1]), torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    r = 1 / math.sqrt(2)
    assert any(torch.allclose(bank.rows[1], torch.tensor(c)) for c in ([r, r], [r, -r]))


def test_update_rejects_bad_shapes():
    bank = MemoryBank(5, 2)
    with pytest.raises(ValueError, match="feats must be"):
        bank.update(torch.tensor([0, 1]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="momentum"):
        bank.update(torch.tensor([0]), torch.randn(1, 2), momentum=1.5)


def test_bank_phases_are_profiled():
    bank = MemoryBank(10, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ids = bank.draw_negatives(torch.tensor([0, 1]), 3)
        bank.fetch(ids)
        bank.update(torch.tensor([0]), torch.randn(1, 4))
    assert {"bank_draw", "bank_gather", "bank_update_rows"} <= {e.name for e in prof.events()}


# --- counter draws: negatives as a function of (seed, step, global sample), not of the rank --------------------


def test_counter_words_are_counter_uniforms_bits():
    index = torch.tensor([0, 7, 123_456_789, 2**33 + 5])
    key = negatives_key(3, 11)
    words = counter_words(key, index, 50)
    assert words.dtype == torch.int64 and words.shape == (4, 50)
    assert torch.equal(words, (counter_uniform(key, index, 50) * 2.0**32).long())


@pytest.mark.parametrize("n", [1, 7, 1000, 2**24, 2**24 + 1, 100_000_000, 2**31 - 1])
def test_bounded_is_exact_multiply_shift(n):
    words = torch.tensor([[0, 0], [2**32 - 1, 2**32 - 1], [123_456, 3_999_999_999], [2**31, 17]])
    one, two = bounded(words[:, :1], n), bounded(words, n)
    for (h0, h1), a, b in zip(words.tolist(), one.tolist(), two.tolist()):
        assert a == (h0 * n) >> 32
        assert b == ((h0 << 32) + h1) * n >> 64  # floor(u * n), u the 64-bit fraction
        assert 0 <= a < n and 0 <= b < n


def test_counter_draws_depend_on_seed_step_and_sample_only():
    bank = MemoryBank(1000, 4)
    index = torch.tensor([5, 17, 900, 3])
    whole = bank.draw_negatives(index, 40, seed=1, step=7)
    # Two ranks with half the batch each, in another order, draw the same rows for the same samples.
    rank0 = bank.draw_negatives(index[[1, 0]], 40, seed=1, step=7)
    rank1 = bank.draw_negatives(index[2:], 40, seed=1, step=7)
    assert torch.equal(whole, torch.cat([rank0[[1, 0]], rank1]))
    assert torch.equal(whole, draw_per_sample(1000, index, 40, key=negatives_key(1, 7)))
    assert not torch.equal(whole, bank.draw_negatives(index, 40, seed=1, step=8))
    assert not torch.equal(whole, bank.draw_negatives(index, 40, seed=2, step=7))
    assert (whole != index[:, None]).all() and whole.min() >= 0 and whole.max() < 1000


def test_counter_per_sample_draw_is_uniform_and_skips_own_row():
    index = torch.arange(8)  # each row the own row of one sample: every row expected equally often
    ids = torch.stack([draw_per_sample(8, index, 7, key=negatives_key(0, step)) for step in range(1250)])
    assert (ids != index[:, None]).all()
    assert _chi_square(torch.bincount(ids.reshape(-1), minlength=8)) < 32  # 7 dof, 70,000 draws, fixed keys


def test_counter_draws_of_a_huge_bank_take_two_words_and_stay_in_range():
    num_rows = 2**26  # above the one-word limit; no bank needed to draw ids
    index = torch.tensor([0, 2**26 - 1, 12_345])
    ids = draw_per_sample(num_rows, index, 2000, key=negatives_key(0, 1))
    assert ids.min() >= 0 and ids.max() < num_rows and (ids != index[:, None]).all()
    assert ids.float().mean().item() == pytest.approx(num_rows / 2, rel=0.05)
    # The first word alone gives the top bits: the two-word value lies in the same one-word bucket or next.
    words = counter_words(negatives_key(0, 1), index, 4000).view(3, 2000, 2)
    approx = bounded(words[..., :1], num_rows - 1)
    exact = bounded(words, num_rows - 1)
    assert ((exact - approx) >= 0).all() and ((exact - approx) <= 1).all()


def test_counter_shared_draw_depends_on_the_global_batch_set_not_on_the_rank():
    bank = MemoryBank(50, 4)
    global_index = torch.tensor([4, 9, 22, 31, 40, 0])
    whole = bank.draw_negatives(global_index, 30, shared=True, seed=5, step=2)
    assert whole.shape == (6, 30) and whole.stride(0) == 0
    for local in (global_index[:3], global_index[3:]):  # each rank passes the gathered indexes as `exclude`
        part = bank.draw_negatives(local, 30, shared=True, seed=5, step=2, exclude=global_index.flip(0))
        assert part.shape == (3, 30) and torch.equal(part[0], whole[0])
    padded = torch.cat([global_index, torch.tensor([-1, -1, 9])])  # padding and a duplicate change nothing
    assert torch.equal(bank.draw_negatives(global_index[:2], 30, shared=True, seed=5, step=2, exclude=padded)[0],
                       whole[0])
    assert not torch.equal(bank.draw_negatives(global_index, 30, shared=True, seed=5, step=3)[0], whole[0])
    assert torch.equal(whole, draw_shared(50, global_index, 30, 6, key=negatives_key(5, 2, shared=True)))
    # Its own stream: not sample 0's per-sample counters (the same (index 0, slot) words under another key).
    assert not torch.equal(counter_words(negatives_key(5, 2, shared=True), torch.zeros(1, dtype=torch.int64), 30),
                           counter_words(negatives_key(5, 2), torch.zeros(1, dtype=torch.int64), 30))


@pytest.mark.parametrize("key", [None, negatives_key(0, 0)])
def test_shared_draw_covers_exactly_the_rows_outside_the_batch_uniformly(key):
    exclude = torch.tensor([7, 2, 2, -1, 19, 0, 12, 13, 7, 25])  # unsorted, duplicates, padding
    ids = draw_shared(20, exclude, 20_000, 1, key=key, generator=None if key is not None else _gen(4))[0]
    allowed = sorted(set(range(20)) - {0, 2, 7, 12, 13, 19})
    assert set(ids.tolist()) == set(allowed)
    assert _chi_square(torch.bincount(ids, minlength=20)[allowed]) < 45  # 13 dof: P(chi2 > 45) ~ 2e-5


def test_shared_draw_needs_no_unique_rows_count_when_the_bank_is_large_enough(monkeypatch):
    def no_unique(*args, **kwargs):
        raise AssertionError("torch.unique called on the hot path")

    monkeypatch.setattr(torch, "unique", no_unique)
    bank = MemoryBank(100, 4)
    bank.draw_negatives(torch.tensor([1, 1, 2]), 97, shared=True, seed=0, step=0)  # 97 <= 100 - 3
    with pytest.raises(AssertionError, match="hot path"):  # only a barely-large-enough bank counts them
        bank.draw_negatives(torch.tensor([1, 1, 2]), 98, shared=True, seed=0, step=0)


def test_counter_draw_arguments_are_checked():
    bank = MemoryBank(10, 4)
    with pytest.raises(ValueError, match="both seed= and step="):
        bank.draw_negatives(torch.tensor([0]), 3, seed=1)
    with pytest.raises(ValueError, match="not both"):
        bank.draw_negatives(torch.tensor([0]), 3, seed=1, step=0, generator=_gen())


def test_counter_unit_rows_are_a_function_of_seed_and_row():
    rows = counter_unit_rows(3, torch.arange(40_000), 16)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(40_000))
    assert torch.equal(counter_unit_rows(3, torch.arange(10, 20), 16), rows[10:20])
    assert not torch.equal(counter_unit_rows(4, torch.arange(10), 16), rows[:10])
    # Uniform on the sphere: each coordinate has mean 0 and variance 1 / dim.
    assert rows.mean(0).abs().max() < 0.01 and (rows.var(0) * 16 - 1).abs().max() < 0.05
    assert torch.equal(MemoryBank(40_000, 16, init_seed=3).rows, rows)
    assert counter_unit_rows(0, torch.arange(3), 5).shape == (3, 5)  # odd dims too


# --- both modes give the same expected loss -------------------------------------------------------------------


def test_per_sample_and_shared_draws_give_the_same_expected_loss():
    """Over many steps' draws, the mean NCE loss of each mode agrees with its exact expectation and with the
    other's within a few standard errors (counter draws with fixed keys: deterministic)."""
    num_rows, dim, batch, k, tau, log_z = 3000, 16, 4, 64, 0.1, 9.0
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(num_rows, dim)
    index = torch.tensor([11, 500, 1701, 2999])
    query = F.normalize(bank.rows[index] + 0.3 * torch.randn(batch, dim, generator=g), dim=1)
    pos = (query * bank.rows[index]).sum(1)

    def loss(ids):
        neg = negative_similarities(query.unsqueeze(0), bank.negatives(ids))[0]
        return nce_loss(pos, neg, tau, log_z, num_rows).item()

    steps = 400
    losses = {shared: torch.tensor([loss(bank.draw_negatives(index, k, shared=shared, seed=0, step=s))
                                    for s in range(steps)]) for shared in (False, True)}
    mean = {m: v.mean().item() for m, v in losses.items()}
    se = {m: v.std().item() / math.sqrt(steps) for m, v in losses.items()}
    # Exact expectations: the loss is a sum over negatives, so only each negative's marginal law matters.
    c = math.log(k / num_rows)
    per_row = F.softplus(query @ bank.rows.T / tau - log_z - c)  # (B, N): each row's term as a negative
    pos_term = F.softplus(c - (pos / tau - log_z))
    own = torch.ones(batch, num_rows, dtype=torch.bool)
    own[torch.arange(batch), index] = False
    outside = torch.ones(num_rows, dtype=torch.bool)
    outside[index] = False
    expected = {
        False: (pos_term + k * (per_row * own).sum(1) / (num_rows - 1)).mean().item(),
        True: (pos_term + k * per_row[:, outside].mean(1)).mean().item(),
    }
    for m in (False, True):
        assert abs(mean[m] - expected[m]) < 4 * se[m], (m, mean[m], expected[m], se[m])
    assert abs(mean[False] - mean[True]) < 4 * math.hypot(se[False], se[True])
    assert se[True] > se[False]  # one shared draw varies more from step to step, as it should


# --- Negatives: the loss without a (B, K, D) copy -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negatives_methods_give_the_materialised_similarities_and_gradients(dtype, monkeypatch):
    from pirl_trainer.model import losses

    monkeypatch.setattr(losses, "_CPU_GATHER_BLOCK", 7)  # several blocks, ragged last one, multi-sample blocks
    table = F.normalize(torch.randn(60, 12), dim=1).to(dtype)
    ids = torch.randint(0, 60, (5, 9), generator=_gen(1))
    weights = torch.randn(2, 5, 9, generator=_gen(2))
    reference = None
    for neg in (table.float()[ids], Negatives(table, ids, "dense"), Negatives(table, ids, "gather"),
                Negatives(table, ids)):
        q = F.normalize(torch.randn(2, 5, 12, generator=_gen(3)), dim=2).requires_grad_()
        sims = negative_similarities(q, neg)
        (sims * weights).sum().backward()
        assert sims.shape == (2, 5, 9) and sims.dtype == torch.float32
        if reference is None:
            reference = sims.detach(), q.grad
        else:
            torch.testing.assert_close(sims.detach(), reference[0])
            torch.testing.assert_close(q.grad, reference[1])
    for blocks in (7, 100):  # one sample's draws in slices; several samples per block
        monkeypatch.setattr(losses, "_CPU_GATHER_BLOCK", blocks)
        torch.testing.assert_close(negative_similarities(q.detach(), Negatives(table, ids, "gather")), reference[0])


def test_pirl_loss_takes_negatives_from_the_bank():
    bank = MemoryBank(40, 8)
    index = torch.tensor([1, 5, 30])
    g_jig, f_img = F.normalize(torch.randn(2, 3, 8), dim=2).unbind(0)
    for shared in (False, True):
        ids = bank.draw_negatives(index, 6, shared=shared, seed=0, step=0)
        kwargs = dict(kind="nce", log_z=2.0, num_data=40, lam=0.3)
        a = pirl_loss(bank.fetch(index), g_jig, f_img, bank.fetch(ids), **kwargs)
        b = pirl_loss(bank.fetch(index), g_jig, f_img, bank.negatives(ids), **kwargs)
        assert isinstance(bank.negatives(ids), torch.Tensor) == shared  # shared: gathered once, a view
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="method"):
        negative_similarities(g_jig.unsqueeze(0), Negatives(bank.rows, ids.contiguous(), "sparse"))


# --- half-precision rows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bank_halves_memory_fetches_float32_and_rounds_the_float32_ema(dtype):
    torch.manual_seed(0)
    full = MemoryBank(200, 32)
    torch.manual_seed(0)
    half = MemoryBank(200, 32, dtype=dtype)
    assert half.rows.dtype == dtype and half.nbytes * 2 == full.nbytes
    assert torch.equal(half.rows, full.rows.to(dtype))  # the same initial draw, rounded
    ids = torch.tensor([[3, 4], [5, 6]])
    assert half.fetch(ids).dtype == torch.float32 and half.fetch(ids, dtype=None).dtype == dtype
    assert torch.equal(half.fetch(ids), half.rows[ids].float())
    shared = half.fetch(half.draw_negatives(torch.tensor([0, 1]), 5, shared=True, seed=0, step=0))
    assert shared.dtype == torch.float32 and shared.stride(0) == 0  # converted once, still a view

    index, feats = torch.tensor([7, 100]), torch.randn(2, 32)
    expected = F.normalize(0.5 * half.rows[index].float() + 0.5 * feats, dim=1).to(dtype)
    half.update(index, feats)
    assert torch.equal(half.rows[index], expected)
    torch.testing.assert_close(half.rows.float().norm(dim=1), torch.ones(200), atol=4e-3, rtol=0)


def test_half_precision_bank_tracks_the_float32_bank_over_many_updates():
    torch.manual_seed(0)
    full = MemoryBank(64, 128)
    half = MemoryBank(64, 128, dtype=torch.bfloat16)
    half.rows.copy_(full.rows)
    g = _gen(5)
    for _ in range(100):
        index = torch.randperm(64, generator=g)[:16]
        feats = F.normalize(torch.randn(16, 128, generator=g), dim=1)
        full.update(index, feats)
        half.update(index, feats)
    # bf16 keeps 8 significant bits: each stored value within ~2^-9 relative, and the error does not grow.
    assert (half.rows.float() - full.rows).abs().max() < 2**-7
    cos = (F.normalize(half.rows.float(), dim=1) * full.rows).sum(1)
    assert cos.min() > 1 - 1e-4


def test_state_dict_keeps_the_dtype_and_loads_across_dtypes():
    torch.manual_seed(0)
    full, half = MemoryBank(10, 4), MemoryBank(10, 4, dtype=torch.bfloat16)
    half.load_state_dict(full.state_dict())
    assert half.state_dict()["rows"].dtype == torch.bfloat16
    assert torch.equal(half.rows, full.rows.to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        MemoryBank(10, 4, dtype=torch.float64)


# --- the update with padding, and the hot path without host synchronisation --------------------------------------


def test_update_ignores_padding_entries():
    bank = MemoryBank(6, 3)
    before = bank.rows.clone()
    feats = torch.randn(4, 3)
    bank.update(torch.tensor([-1, 4, -1, 1]), feats)
    expected = before.clone()
    expected[[4, 1]] = F.normalize(0.5 * before[[4, 1]] + 0.5 * feats[[1, 3]], dim=1)
    torch.testing.assert_close(bank.rows, expected)
    bank.update(torch.tensor([-1, -1]), torch.randn(2, 3))  # nothing but padding: nothing changes
    torch.testing.assert_close(bank.rows, expected)


def _hot_path(bank_cls, dtype):
    """Draw (both modes, both kinds of randomness), fetch, loss forward and backward, update: one step's bank work."""
    bank = bank_cls(100, 8, dtype=dtype)
    index = torch.tensor([3, 50, 7, 99])
    for shared in (False, True):
        for randomness in (dict(seed=0, step=4), dict(generator=None)):
            exclude = torch.tensor([3, 50, 7, 99, 1, 2, -1, -1]) if shared else None
            ids = bank.draw_negatives(index, 20, shared=shared, exclude=exclude, **randomness)
            negatives = [bank.negatives(ids)] if shared else [
                bank.negatives(ids), Negatives(bank.rows, ids, "gather"), bank.fetch(ids)]
            for neg in negatives:
                g_jig, f_img = torch.randn(2, 4, 8, requires_grad=True).unbind(0)
                out = pirl_loss(bank.fetch(index), g_jig, f_img, neg, log_z=torch.tensor(1.0), num_data=100)
                out["loss"].backward()
            bank.update(torch.cat([index, torch.tensor([-1, -1])]), torch.randn(6, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hot_path_has_no_data_dependent_op(dtype):
    """Run on fake tensors, which hold no data: any op whose result or output shape depends on values (.item(),
    bool(), torch.unique, nonzero, boolean masks; each a host sync on a GPU) raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        _hot_path(MemoryBank, dtype)


def test_the_fake_tensor_check_catches_syncs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        index = torch.arange(4)
        for sync in (lambda: index.sum().item(), lambda: bool(index.any()), lambda: torch.unique(index),
                     lambda: index[index > 1], lambda: index[index.argmax()]):
            with pytest.raises(RuntimeError):  # DataDependentOutput / DynamicOutputShape exceptions
                sync()


@pytest.mark.gpu  # torch.cuda.set_sync_debug_mode
def test_hot_path_does_not_sync_a_gpu():
    torch.set_default_device("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        _hot_path(MemoryBank, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.set_default_device("cpu")
