import pytest

from tests.tools.pool_helpers import crashed, die_on_13, hang_on_13, square
from pirl_trainer.tools.sharding.ordered_pool import CHUNKS_PER_WORKER, OrderedPool


@pytest.mark.parametrize("workers", [0, 2])
def test_results_come_in_input_order(workers):
    with OrderedPool(square, workers, on_crash=crashed, chunk_size=3) as pool:
        assert list(pool.map(range(50))) == [(i, i * i) for i in range(50)]


def test_input_is_consumed_only_as_far_as_the_window():
    consumed = []

    def items():
        for i in range(10_000):
            consumed.append(i)
            yield i

    with OrderedPool(square, 1, on_crash=crashed, chunk_size=4) as pool:
        results = pool.map(items())
        assert next(results) == (0, 0)
        assert len(consumed) <= (CHUNKS_PER_WORKER + 1) * 4
        results.close()


# The hang timeout also covers spawning the workers (~1-2 s, more on a loaded machine): keep it well above that.
@pytest.mark.parametrize("fn, timeout_s", [(die_on_13, 300.0), (hang_on_13, 12.0)])
def test_a_dead_or_hung_worker_costs_only_its_item(fn, timeout_s):
    with OrderedPool(fn, 2, on_crash=crashed, chunk_size=4, timeout_s=timeout_s) as pool:
        results = list(pool.map(range(30)))
    assert results == [(i, "crashed on 13" if i == 13 else i * i) for i in range(30)]
