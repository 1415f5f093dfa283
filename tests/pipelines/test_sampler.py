import numpy as np
import pytest

from pirl_trainer.pipelines.sampler import epoch_batches, epoch_order, rank_sample_count, steps_per_epoch


def _all_batches(n, b, world, **kw):
    return [epoch_batches(n, b, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize(("n", "b", "world"), [(31, 4, 2), (10, 3, 4), (7, 8, 2), (100, 7, 3), (5, 1, 5)])
def test_every_sample_exactly_once_and_equal_steps(n, b, world):
    per_rank = _all_batches(n, b, world, seed=3, epoch=1)
    seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert sorted(seen.tolist()) == list(range(n))
    steps = steps_per_epoch(n, b, world)
    assert all(len(batches) == steps for batches in per_rank)
    for batches in per_rank:
        assert all(len(x) == b for x in batches[:-1])
        assert 1 <= len(batches[-1]) <= b + 1


def test_two_ranks_times_two_workers_uneven():
    # A DataLoader with 2 workers hands batches round-robin to its workers: split each rank's batches so.
    n, b = 31, 4
    per_rank = _all_batches(n, b, 2, seed=0, epoch=0)
    chunks = [np.concatenate(batches[w::2]) for batches in per_rank for w in range(2)]
    seen = np.concatenate(chunks)
    assert len(seen) == n and len(np.unique(seen)) == n
    assert [len(batches) for batches in per_rank] == [4, 4]
    assert [len(x) for x in per_rank[0]] == [4, 4, 4, 4]  # 16 samples: the remainder goes to rank 0
    assert [len(x) for x in per_rank[1]] == [4, 4, 4, 3]  # 15 samples


@pytest.mark.parametrize(("n", "b", "world"), [(31, 4, 2), (10, 3, 4), (100, 7, 3), (64, 8, 2)])
def test_rank_sample_counts_are_q_or_q_plus_one(n, b, world):
    counts = [rank_sample_count(n, b, world, r) for r in range(world)]
    assert counts == [sum(len(x) for x in batches) for batches in _all_batches(n, b, world)]
    assert sum(counts) == n and set(counts) <= {n // world, n // world + 1}


@pytest.mark.parametrize(("n", "b"), [(64, 4), (40, 5), (31, 4), (7, 2)])
def test_two_ranks_of_batch_b_read_the_global_batches_of_one_rank_of_batch_2b(n, b):
    """Step by step, the union of the ranks' batches is the single process's batch: N processes = 1 process."""
    two = _all_batches(n, b, 2, seed=1, epoch=3)
    (one,) = _all_batches(n, 2 * b, 1, seed=1, epoch=3)
    if steps_per_epoch(n, b, 2) == steps_per_epoch(n, 2 * b, 1):
        for step, batch in enumerate(one):
            assert np.concatenate([two[0][step], two[1][step]]).tolist() == batch.tolist()
    else:  # N too uneven for equal step counts (7 = 2 steps of 2x2 vs 1 of 4+3): still exactly once
        assert sorted(np.concatenate([np.concatenate(x) for x in two]).tolist()) == list(range(n))


def test_last_batch_can_take_one_extra():
    # q = 8 // 2 = 4 = one full batch of 4 on each rank; with n = 9 rank 0 takes the 9th in its last batch.
    assert [len(x) for x in epoch_batches(9, 4, rank=0, world_size=2)] == [5]
    assert [len(x) for x in epoch_batches(9, 4, rank=1, world_size=2)] == [4]


def test_more_ranks_than_samples_is_an_error():
    with pytest.raises(ValueError, match="fewer than world_size"):
        epoch_batches(3, 2, rank=0, world_size=4)


def test_resume_from_start_step_gives_the_tail():
    full = epoch_batches(50, 6, rank=1, world_size=2, seed=5, epoch=2)
    tail = epoch_batches(50, 6, rank=1, world_size=2, seed=5, epoch=2, start_step=3)
    assert len(tail) == len(full) - 3
    assert all(np.array_equal(a, b) for a, b in zip(full[3:], tail))
    assert epoch_batches(50, 6, rank=1, world_size=2, start_step=len(full)) == []
    with pytest.raises(ValueError, match="start_step"):
        epoch_batches(50, 6, rank=1, world_size=2, start_step=len(full) + 1)


def test_order_is_deterministic_per_seed_and_epoch():
    a = epoch_order(1000, seed=1, epoch=4)
    assert np.array_equal(a, epoch_order(1000, seed=1, epoch=4))
    assert not np.array_equal(a, epoch_order(1000, seed=1, epoch=5))
    assert not np.array_equal(a, epoch_order(1000, seed=2, epoch=4))
    assert sorted(a.tolist()) == list(range(1000))


def test_eval_order_is_the_identity():
    batches = epoch_batches(10, 3, rank=0, world_size=1, shuffle=False)
    assert np.concatenate(batches).tolist() == list(range(10))
    assert [len(x) for x in batches] == [3, 3, 3, 1]
