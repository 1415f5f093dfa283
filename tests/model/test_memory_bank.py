import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model.memory_bank import MemoryBank


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
