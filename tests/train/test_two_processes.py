"""`accelerate launch` with two CPU processes (gloo): both ranks' bank updates, and N processes = 1 process."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.memory_bank import MemoryBank
from model.pirl import PIRLNet
from pipelines.sampler import epoch_batches
from tests.train.conftest import tiny_overrides
from train import checkpoint, pirl
from train.run_log import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def launch_two(args: list[str], port: int) -> None:
    """train/pirl.py under `accelerate launch` with 2 CPU processes over gloo (DEPENDENCIES.md: the flags that
    work; `--cpu --num_processes 2` silently runs one process)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "pirl.py"), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


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


@pytest.mark.slow
def test_two_processes_of_batch_b_train_like_one_of_batch_2b(synthetic_shards, tmp_path):
    """Same seed, same global batch: the losses agree step by step, and so do the final weights and bank. Then a
    checkpoint of the 2-process run resumes on 1 process, and one of the 1-process run on 2, continuing it."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    pirl.main(same_run(synthetic_shards, one, 1))  # 30 samples / 8: 4 steps an epoch, 8 in all
    launch_two(same_run(synthetic_shards, two, 2), port=29518)
    expected = losses(one)
    assert sorted(expected) == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(two / "log.jsonl")] == list(range(1, 9))  # written by rank 0 alone
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir())  # one file per checkpoint step, no per-rank copies
    for step, loss in losses(two).items():
        assert loss == pytest.approx(expected[step], rel=2e-4), step
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 8)) for d in (one, two))
    assert (a["world_size"], b["world_size"], a["global_batch"], b["global_batch"]) == (1, 2, 8, 8)
    torch.testing.assert_close(b["bank"]["rows"], a["bank"]["rows"], rtol=1e-3, atol=1e-4)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-3, atol=1e-4)

    # 2 processes stopped after step 3 (its checkpoint), resumed on 1; and the other way round.
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    launch_two([*same_run(synthetic_shards, two_then_one, 2), "--run.max_steps=3"], port=29519)
    pirl.main([*same_run(synthetic_shards, two_then_one, 1), "--resume"])
    pirl.main([*same_run(synthetic_shards, one_then_two, 1), "--run.max_steps=3"])
    launch_two([*same_run(synthetic_shards, one_then_two, 2), "--resume"], port=29520)
    for out_dir in (two_then_one, one_then_two):
        resumed = losses(out_dir)
        assert sorted(resumed) == list(range(1, 9))
        for step in range(1, 9):
            assert resumed[step] == pytest.approx(expected[step], rel=2e-4), (out_dir.name, step)
