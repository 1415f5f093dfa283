"""`accelerate launch` with two CPU processes (gloo): the bank saved by rank 0 holds both ranks' updates."""
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
from train import checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_run_updates_the_bank_rows_of_both_ranks(synthetic_shards, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "pirl.py"),
        *tiny_overrides(synthetic_shards, tmp_path), "--run.max_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    state = checkpoint.load(checkpoint.checkpoint_path(tmp_path, 1))
    assert state["world_size"] == 2 and state["step"] == 1
    torch.manual_seed(0)  # the trainer's construction order: seed, network, bank
    PIRLNet("resnet18")
    initial = MemoryBank(30, 128).rows
    visited = np.concatenate([b for rank in (0, 1) for b in epoch_batches(30, 8, rank=rank, world_size=2)[:1]])
    changed = (state["bank"]["rows"] - initial).abs().sum(dim=1) > 1e-6
    assert set(np.flatnonzero(changed.numpy())) == set(visited.tolist())  # both ranks' rows, no others
