"""Real signals to a real training process: SIGTERM checkpoints and exits cleanly, SIGKILL loses nothing that
--resume cannot redo; either way the resumed run continues from the checkpoint's step and its losses are the
uninterrupted run's."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import tiny_overrides
from pirl_trainer.train import checkpoint
from pirl_trainer.train.run_log import read_jsonl

REPO = Path(__file__).resolve().parents[2]
LONG = ["--optim.epochs=50"]  # 200 steps: far more than the process gets to run before the signal


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "log.jsonl")}  # later lines win: resumed ones


def logged_steps(out_dir: Path) -> list[int]:
    """Every logged step in order: the log is appended to, so a run that ignored --resume would repeat 1, 2, ..."""
    return [r["step"] for r in read_jsonl(out_dir / "log.jsonl")]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train" / "pirl.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(args: list[str]) -> str:
    """A whole run in a process like the interrupted one (same thread settings: the same float results); its stdout."""
    process = start(args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return out


def wait_for_steps(process: subprocess.Popen, out_dir: Path, steps: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        log = out_dir / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {steps} logged steps within {timeout} s")


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_continues(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides(synthetic_shards, run), *LONG, "--run.ckpt_every=1000"]
    process = start(args)
    wait_for_steps(process, run, 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    stopped_at = checkpoint.load(checkpoint.latest_checkpoint(run))["step"]
    assert stopped_at >= 2 and f"stopped on SIGTERM after step {stopped_at}" in out + err
    assert logged_steps(run) == list(range(1, stopped_at + 1))  # the step it checkpointed is the last one it trained

    out = run_to_end([*args, f"--run.max_steps={stopped_at + 2}", "--resume"])
    assert f"resumed from {checkpoint.checkpoint_path(run, stopped_at)} at step {stopped_at}" in out
    assert logged_steps(run) == list(range(1, stopped_at + 3))
    alone = tmp_path / "alone"
    run_to_end([*tiny_overrides(synthetic_shards, alone), *LONG, f"--run.max_steps={stopped_at + 2}"])
    resumed, expected = losses(run), losses(alone)
    for step in range(1, stopped_at + 3):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_reproduces_the_run(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides(synthetic_shards, run), *LONG, "--run.ckpt_every=1"]
    process = start(args)
    wait_for_steps(process, run, 3 + int.from_bytes(os.urandom(1), "little") % 3)  # killed after step 3..5
    process.kill()  # SIGKILL: no handler, no checkpoint of its own; maybe mid-write
    process.communicate(timeout=60)
    latest = checkpoint.latest_checkpoint(run)
    resumed_from = checkpoint.load(latest)["step"]  # loads: a half-written file is never taken for one
    before = logged_steps(run)
    assert resumed_from >= 2 and before == list(range(1, len(before) + 1)) and resumed_from <= before[-1]

    out = run_to_end([*args, f"--run.max_steps={resumed_from + 3}", "--resume"])
    assert f"resumed from {latest} at step {resumed_from}" in out
    # A step logged after the last checkpoint is trained again; nothing before that checkpoint is.
    assert logged_steps(run) == before + list(range(resumed_from + 1, resumed_from + 4))
    alone = tmp_path / "alone"
    run_to_end([*tiny_overrides(synthetic_shards, alone), *LONG, f"--run.max_steps={resumed_from + 3}"])
    resumed, expected = losses(run), losses(alone)
    for step in range(1, resumed_from + 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
