import itertools
import math

import numpy as np
import pytest
import torch

from pirl_trainer.model.permutations import greedy_selection, max_hamming_permutations


def _hamming(a, b) -> int:
    return sum(x != y for x, y in zip(a, b))


def _pairwise_min(perms: np.ndarray) -> int:
    """Vectorised minimum Hamming distance over all pairs of rows."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(axis=2)
    return int(d[np.triu_indices(len(perms), 1)].min())


def test_min_distance_is_what_each_greedy_step_claimed():
    perms, claimed = greedy_selection(100)
    rows = [tuple(r) for r in perms.tolist()]
    # Brute force over the pairs: row i's distance to every earlier row, in plain Python.
    for i in range(1, len(rows)):
        assert min(_hamming(rows[i], rows[j]) for j in range(i)) == claimed[i - 1]
    pair_min = min(_hamming(a, b) for a, b in itertools.combinations(rows, 2))
    assert pair_min == claimed.min() == claimed[-1]
    assert np.all(np.diff(claimed) <= 0)  # the greedy maximum can only shrink as the set grows
    assert pair_min >= 6  # measured: 6 for k=100 (the docstring)


def test_rows_are_distinct_valid_permutations():
    perms = max_hamming_permutations(1000)
    assert perms.shape == (1000, 9) and perms.dtype == torch.int64
    assert torch.equal(perms.sort(dim=1).values, torch.arange(9).expand(1000, 9))
    assert len({tuple(r) for r in perms.tolist()}) == 1000


def test_k1000_min_distance_at_least_the_measured_five():
    assert _pairwise_min(max_hamming_permutations(1000).numpy()) >= 5


def test_deterministic_per_seed_and_seed_matters():
    a, _ = greedy_selection(50, seed=3)
    b, _ = greedy_selection(50, seed=3)
    c, _ = greedy_selection(50, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert torch.equal(max_hamming_permutations(50, seed=3), torch.from_numpy(a))


def test_cached_table_is_not_shared_with_callers():
    first = max_hamming_permutations(20)
    first.zero_()
    assert not torch.equal(max_hamming_permutations(20), first)


def test_all_permutations_of_a_small_grid():
    perms = max_hamming_permutations(math.factorial(4), num_patches=4)
    assert {tuple(r) for r in perms.tolist()} == set(itertools.permutations(range(4)))
    assert max_hamming_permutations(1).shape == (1, 9)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=0), ValueError, "k must be in 1..362880"),
    (dict(k=362881), ValueError, "k must be in 1..362880"),
    (dict(k=7, num_patches=3), ValueError, r"k must be in 1..6 \(3! permutations"),
    (dict(k=10, num_patches=10), ValueError, "num_patches must be in 1..9"),
    (dict(k=10, seed=-1), ValueError, "seed must be non-negative"),
    (dict(k=10.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        max_hamming_permutations(**kwargs)
