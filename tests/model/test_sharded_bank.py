"""The sharded bank against the replicated one, in 2 CPU processes over gloo (torch.multiprocessing.spawn).

Every step of the spawned run: a global batch of 2 x B rows (the last step uneven: padding -1), each rank's half
drawn with counter draws (per-sample and shared, the global batch excluded), the loss computed with both banks,
the global batch's features all-gathered and applied to both. The test then checks, in this process: the same
draws, losses, gradients and final bank for both; the replicated bank identical on both ranks; the 2-process
losses equal to a 1-process run with batch 2B; the whole bank from the sharded state_dict; the shared path free
of data-dependent ops.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pirl_trainer.model.losses import pirl_loss
from pirl_trainer.model.memory_bank import MemoryBank
from pirl_trainer.model.sharded_bank import ShardedMemoryBank
from tests.multiprocess import run_on_ranks

WORLD, B, K, DIM, ROWS, STEPS, INIT_SEED, SEED = 2, 6, 40, 16, 101, 5, 3, 9  # 101 rows: shards of 51 and 50
LOSS = dict(kind="nce", log_z=2.0, num_data=ROWS, lam=0.5)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def global_batch(step: int) -> torch.Tensor:
    """(WORLD * B,) distinct rows; the last step's batch is uneven (rank 1 has B - 1 samples, padded with -1)."""
    index = torch.randperm(ROWS, generator=torch.Generator().manual_seed(100 + step))[: WORLD * B]
    if step == STEPS - 1:
        index[-1] = -1
    return index


def queries(step: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g_jig, f_img (len(index), DIM) for samples `index`: a function of (step, sample), not of the rank."""
    table = F.normalize(torch.randn(2, ROWS, DIM, generator=torch.Generator().manual_seed(step)), dim=2)
    return table[0, index].requires_grad_(), table[1, index].requires_grad_()


def loss_and_grads(bank, local, neg_rows, step, bank_pos=None):
    g_jig, f_img = queries(step, local)
    bank_pos = bank.fetch(local) if bank_pos is None else bank_pos
    out = pirl_loss(bank_pos, g_jig, f_img, bank.negatives(neg_rows), **LOSS)
    out["loss"].backward()
    return out["loss"].detach(), g_jig.grad, f_img.grad


class NoDataDependentOps(TorchDispatchMode):
    """Raises on any op whose output shape or value must be read on the host (a sync on a GPU)."""

    BANNED = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::masked_select", "aten::bincount", "aten::repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in self.BANNED or bool_index:
            raise AssertionError(f"data-dependent op on the hot path: {name}")
        return func(*args, **(kwargs or {}))


def _run(rank: int, dtype: torch.dtype) -> dict:
    rep = MemoryBank(ROWS, DIM, dtype=dtype, init_seed=INIT_SEED)
    sharded = ShardedMemoryBank(ROWS, DIM, dtype=dtype, init_seed=INIT_SEED)
    out = {"initial_shard_equal": torch.equal(sharded.shard, rep.rows[rank::WORLD]),
           "nbytes": (sharded.nbytes, rep.nbytes), "steps": []}
    for step in range(STEPS):
        index = global_batch(step)
        local = index[rank * B:(rank + 1) * B]
        local = local[local >= 0]  # this rank's samples (test code: a mask is fine here)
        record = {}
        for shared in (False, True):
            draws = [bank.draw_negatives(local, K, shared=shared, seed=SEED, step=step, exclude=index)
                     for bank in (rep, sharded)]
            with NoDataDependentOps() if shared else torch.enable_grad():
                # Shared draw: the positives through the all-gathered global batch, the negatives with one
                # all-reduce: no data-dependent op (per-sample draws are routed and sync once, by design).
                pos = sharded.fetch(index, same_on_all_ranks=True)[rank * B:rank * B + len(local)] if shared \
                    else None
                s_loss, s_g, s_f = loss_and_grads(sharded, local, draws[1], step, pos)
            r_loss, r_g, r_f = loss_and_grads(rep, local, draws[0], step)
            record["shared" if shared else "per_sample"] = {
                "ids": draws[0].contiguous(), "same_ids": torch.equal(draws[0], draws[1]),
                "rep": (r_loss, r_g, r_f), "sharded": (s_loss, s_g, s_f), "samples": len(local),
            }
        out["steps"].append(record)
        # The update: every rank's features for the global batch (the training loop's all-gather), padded.
        feats = F.pad(queries(step, local)[1].detach(), (0, 0, 0, B - len(local)))
        gathered = torch.empty(WORLD * B, DIM)
        dist.all_gather_into_tensor(gathered, feats)
        rep.update(index, gathered)
        with NoDataDependentOps():
            sharded.update(index, gathered)
    out["replicated"] = rep.rows.clone()
    replicas = torch.empty(WORLD * ROWS, DIM, dtype=dtype)
    dist.all_gather_into_tensor(replicas, rep.rows.contiguous())
    out["replicas"] = replicas.view(WORLD, ROWS, DIM)
    out["state"] = sharded.state_dict()  # whole bank on rank 0
    out["state_everywhere"] = sharded.state_dict(dst=None)
    # Resuming a replicated checkpoint on the sharded bank (and back through its state_dict).
    other = ShardedMemoryBank(ROWS, DIM, dtype=dtype, init_seed=INIT_SEED + 1)
    other.load_state_dict({"rows": rep.rows.float()})
    out["reloaded"] = other.state_dict(dst=None)["rows"]
    return out


def _run_every_dtype(rank: int) -> dict:
    return {name: _run(rank, dtype) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_ranks(_run_every_dtype, WORLD, tmp_path_factory.mktemp("sharded"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_and_replicated_give_the_same_draws_losses_and_gradients(runs, dtype):
    for rank in range(WORLD):
        run = runs[rank][dtype]
        assert run["initial_shard_equal"]
        for record in run["steps"]:
            for mode in ("per_sample", "shared"):
                r = record[mode]
                assert r["same_ids"]
                for a, b in zip(r["rep"], r["sharded"]):
                    if mode == "shared":  # the same rows, the same arithmetic
                        assert torch.equal(a, b)
                    else:  # the replicated bank's loss skips the (B, K, D) rows the sharded one receives
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_and_replicated_end_with_the_same_bank_and_replicas_agree(runs, dtype):
    rep = runs[0][dtype]["replicated"]
    assert rep.dtype == DTYPES[dtype]
    for rank in range(WORLD):
        run = runs[rank][dtype]
        assert torch.equal(run["replicas"][0], run["replicas"][1])  # replicas identical on all ranks
        assert torch.equal(run["replicated"], rep)
        assert torch.equal(run["state_everywhere"]["rows"], rep)
        assert torch.equal(run["reloaded"], rep.float().to(DTYPES[dtype]))
        shard_bytes, whole_bytes = run["nbytes"]
        assert shard_bytes == (ROWS // WORLD + (rank < ROWS % WORLD) + 1) * DIM * rep.element_size()
        assert shard_bytes < 0.52 * whole_bytes
    assert torch.equal(runs[0][dtype]["state"]["rows"], rep) and runs[1][dtype]["state"] == {}
    # The bank moved: rows of the batches changed, unit norm kept.
    assert not torch.equal(rep, MemoryBank(ROWS, DIM, dtype=DTYPES[dtype], init_seed=INIT_SEED).rows)
    torch.testing.assert_close(rep.float().norm(dim=1), torch.ones(ROWS), atol=4e-3, rtol=0)


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(runs):
    """Counter draws: the 2-process losses (weighted by samples) are the 1-process losses with the global batch."""
    bank = MemoryBank(ROWS, DIM, init_seed=INIT_SEED)
    for step in range(STEPS):
        index = global_batch(step)
        index = index[index >= 0]
        for shared in (False, True):
            ids = bank.draw_negatives(index, K, shared=shared, seed=SEED, step=step)
            mode = "shared" if shared else "per_sample"
            parts = [runs[r]["float32"]["steps"][step][mode] for r in range(WORLD)]
            assert torch.equal(torch.cat([p["ids"] for p in parts]), ids.contiguous())  # the same negatives
            loss, g, f = loss_and_grads(bank, index, ids, step)
            two = sum(p["rep"][0] * p["samples"] for p in parts) / len(index)
            torch.testing.assert_close(two, loss, rtol=1e-6, atol=1e-6)
            # Gradients per sample: the mean over 2B halves each sample's weight against the mean over B.
            for i, grad in ((1, g), (2, f)):
                two_grads = torch.cat([p["rep"][i] * p["samples"] for p in parts]) / len(index)
                torch.testing.assert_close(two_grads, grad, rtol=1e-5, atol=1e-7)
        bank.update(index, queries(step, index)[1].detach())
    torch.testing.assert_close(bank.rows, runs[0]["float32"]["replicated"], rtol=0, atol=1e-6)


def test_a_single_process_sharded_bank_is_the_whole_bank():
    bank = ShardedMemoryBank(ROWS, DIM, init_seed=INIT_SEED)
    rep = MemoryBank(ROWS, DIM, init_seed=INIT_SEED)
    assert bank.world_size == 1 and torch.equal(bank.shard, rep.rows)
    index = torch.tensor([4, -1, 60])
    rows = bank.fetch(index)
    assert torch.equal(rows[[0, 2]], rep.rows[[4, 60]]) and not rows[1].any()
    ids = bank.draw_negatives(index[[0, 2]], 7, shared=True, generator=torch.Generator().manual_seed(0))
    assert bank.fetch(ids).stride(0) == 0
    feats = torch.randn(3, DIM)
    bank.update(index, feats)
    rep.update(index, feats)
    assert torch.equal(bank.state_dict()["rows"], rep.rows)
    with pytest.raises(ValueError, match="shape"):
        bank.load_state_dict({"rows": torch.zeros(ROWS + 1, DIM)})


def test_the_sentinel_catches_data_dependent_ops():
    t = torch.tensor([1, 2, 3])
    for op in (lambda: t.sum().item(), lambda: t[t > 1], lambda: torch.unique(t), lambda: bool(t.any()),
               lambda: torch.bincount(t, minlength=4)):
        with pytest.raises(AssertionError, match="data-dependent"), NoDataDependentOps():
            op()
