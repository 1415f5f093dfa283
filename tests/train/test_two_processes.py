"""`accelerate launch` with two CPU processes (gloo): both ranks' bank updates, and N processes = 1 process."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl_trainer.model.memory_bank import MemoryBank
from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.pipelines.sampler import epoch_batches
from tests.train.conftest import tiny_overrides
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.run_log import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def two_process_command(args: list[str], port: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of train/pirl.py under `accelerate launch` with 2 CPU processes over gloo
    (DEPENDENCIES.md: the flags that work; `--cpu --num_processes 2` silently runs one process)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "pirl.py"), *args,
    ]
    return command, {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}


def launch_two(args: list[str], port: int) -> subprocess.CompletedProcess:
    command, env = two_process_command(args, port)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "log.jsonl")}  # later lines win: resumed ones


def same_run(shards, out_dir, processes: int) -> list[str]:
    """One run, split over 1 or 2 processes: global batch 8, synchronised BatchNorm."""
    return [*tiny_overrides(shards, out_dir), f"--data.batch_size={8 // processes}", "--model.sync_bn=true"]


@pytest.mark.slow
def test_two_process_run_updates_the_bank_rows_of_both_ranks(synthetic_shards, tmp_path):
    launch_two([*tiny_overrides(synthetic_shards, tmp_path), "--run.max_steps=1"], port=29517)

    state = checkpoint.load(checkpoint.checkpoint_path(tmp_path, 1))
    assert state["world_size"] == 2 and state["step"] == 1
    torch.manual_seed(0)  # the trainer's construction order: seed, network, bank
    PIRLNet("resnet18")
    initial = MemoryBank(30, 128).rows
    visited = np.concatenate([b for rank in (0, 1) for b in epoch_batches(30, 8, rank=rank, world_size=2)[:1]])
    changed = (state["bank"]["rows"] - initial).abs().sum(dim=1) > 1e-6
    assert set(np.flatnonzero(changed.numpy())) == set(visited.tolist())  # both ranks' rows, no others


def update_error(a: dict, b: dict, initial: dict) -> float:
    """|(b - initial) - (a - initial)| / |a - initial| over all floating-point weights: how far two runs' updates
    from the same start differ, relative to the update itself."""
    num = den = 0.0
    for key, w0 in initial.items():
        if w0.is_floating_point():
            num += float((b[key] - a[key]).double().square().sum())
            den += float((a[key] - w0).double().square().sum())
    return (num / den) ** 0.5


@pytest.mark.slow
def test_two_processes_of_batch_b_train_like_one_of_batch_2b(synthetic_shards, tmp_path):
    """Same seed, same global batch of 8, synchronised BatchNorm: the same samples, draws and losses, and the same
    update. Then checkpoints cross process counts: 2 -> 1 and 1 -> 2 continue the run they came from.

    Float32 rounding bounds how far "the same" goes: BatchNorm's backward at random init subtracts nearly equal
    per-sample gradients, which amplifies rounding (0.5 % of the first update here; 6e-8 in float64), and the
    runs then drift apart step by step as any two float32 runs with different reduction orders do. So the test
    checks the first steps tightly and each resumed step against its own run.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    every_step = ["--run.ckpt_every=1", "--run.max_steps=4"]
    pirl.main([*same_run(synthetic_shards, one, 1), *every_step])
    launch_two([*same_run(synthetic_shards, two, 2), *every_step], port=29518)
    expected, got = losses(one), losses(two)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(two / "log.jsonl")] == [1, 2, 3, 4]  # written by rank 0 alone
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir())  # one file per checkpoint step, no per-rank copies
    assert got[1] == pytest.approx(expected[1], rel=1e-5)  # same samples, crops, patch orders, negatives, log Z
    assert got[2] == pytest.approx(expected[2], rel=2e-3)  # after one update
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 1)) for d in (one, two))
    assert (a["world_size"], b["world_size"], a["global_batch"], b["global_batch"]) == (1, 2, 8, 8)
    torch.manual_seed(0)
    initial = PIRLNet("resnet18").state_dict()
    # A wrong loss weighting or gradient average would be off by ~100 %; rounding gives ~0.5 %.
    assert update_error(a["model"], b["model"], initial) < 0.03
    torch.testing.assert_close(b["bank"]["rows"], a["bank"]["rows"], rtol=0, atol=1e-4)

    # Resume each run's step-2 checkpoint on the other process count: the next step is the run's own step 3.
    for source, processes, port in ((two, 1, 29519), (one, 2, 29520)):
        resumed = tmp_path / f"{source.name}_on_{processes}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(checkpoint.checkpoint_path(source, 2), checkpoint.checkpoint_path(resumed, 2))
        args = [*same_run(synthetic_shards, resumed, processes), "--run.max_steps=3", "--resume"]
        pirl.main(args) if processes == 1 else launch_two(args, port=port)
        assert losses(resumed)[3] == pytest.approx(losses(source)[3], rel=1e-5), source.name
