"""2 processes against 1 in the configurations beyond the default one: a sharded bank with shared negatives, an
uneven last step, a corrupt sample on one rank, SIGTERM reaching one rank, and the DALI backend.

Same seed and global batch throughout, so the first step's loss is the single process's up to rounding and later
steps drift as test_two_processes.py explains; each test compares step 1 tightly.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl_trainer.model.losses import nce_loss
from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.pipelines.sampler import epoch_batches
from pirl_trainer.pipelines.shard_index import ShardReader, build_sample_table
from tests.train.conftest import tiny_overrides
from tests.train.test_two_processes import REPO, launch_two, losses, same_run, two_process_command, update_error
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.tools.synthetic_data import write_synthetic
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.run_log import read_jsonl


@pytest.fixture
def loss_calls(monkeypatch) -> list[tuple[dict, dict]]:
    """Every pirl_loss call of the in-process runs that follow: (its keyword arguments, its outputs detached), the
    per-sample similarities a rank's share of the loss can be recomputed from."""
    calls = []
    original = pirl.pirl_loss

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs, {k: v.detach() for k, v in out.items()}))
        return out

    monkeypatch.setattr(pirl, "pirl_loss", record)
    return calls


def subset_loss(call: tuple[dict, dict], rows: slice) -> float:
    """The loss of the samples `rows` of a recorded pirl_loss call alone: the same terms, log Z and weights over
    those samples' similarities."""
    kwargs, out = call
    assert kwargs["kind"] == "nce"
    total = 0.0
    for name, weight in (("jigsaw", kwargs["lam"]), ("image", 1.0 - kwargs["lam"])):
        if weight > 0:
            term = nce_loss(out[f"pos_{name}"][rows], out[f"neg_{name}"][rows], kwargs["tau"], out["log_z"],
                            kwargs["num_data"])
            total += weight * float(term)
    return total


def initial_weights() -> dict:
    torch.manual_seed(0)  # the trainer's: seed, then the network
    return PIRLNet("resnet18").state_dict()


def two_steps_on_one_and_two_processes(shards, tmp_path, extra: list[str], port: int) -> tuple[Path, Path]:
    """Two steps of one run on 1 process and on 2 (global batch 8): step 1's loss must match to rounding, step 2's
    closely (test_two_processes.py: the runs drift apart from the first update). Returns both run folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    pirl.main([*same_run(shards, one, 1), *extra, "--run.max_steps=2"])
    launch_two([*same_run(shards, two, 2), *extra, "--run.max_steps=2"], port=port)
    expected, got = losses(one), losses(two)
    assert sorted(expected) == sorted(got) == [1, 2]
    assert got[1] == pytest.approx(expected[1], rel=1e-5)
    assert got[2] == pytest.approx(expected[2], rel=2e-3)
    return one, two


@pytest.mark.slow
def test_sharded_bank_with_shared_negatives_trains_like_one_process(synthetic_shards, tmp_path):
    """Each rank holds half the rows; one draw of negatives for the global batch, fetched with an all-reduce, must
    be the same on both ranks and the single process's: the same losses, update and bank."""
    sharded = ["--loss.bank=sharded", "--loss.shared_negatives=true", "--run.ckpt_every=1"]
    one, two = two_steps_on_one_and_two_processes(synthetic_shards, tmp_path, sharded, port=29521)
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 1)) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert update_error(a["model"], b["model"], initial_weights()) < 0.03
    # the whole bank, gathered from both shards in global row order
    torch.testing.assert_close(b["bank"]["rows"], a["bank"]["rows"], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def nine_shards(tmp_path_factory):
    """Shards of 9 synthetic images (one per class, one class left out)."""
    root = tmp_path_factory.mktemp("nine")
    write_synthetic(root / "images", per_class=1, size=64, seed=0)
    shutil.rmtree(sorted((root / "images").iterdir())[-1])
    build_shards(root / "images", root / "shards", workers=1, shard_size=40_000)
    return root / "shards"


@pytest.mark.slow
def test_uneven_step_weights_each_rank_by_its_share(nine_shards, tmp_path, loss_calls):
    """9 samples at a global batch of 10: each epoch is one step, 5 samples on rank 0 and 4 on rank 1. Weighted by
    those shares the ranks' mean losses make the single process's mean over its 9, logged and differentiated;
    the plain mean of the two ranks' means is measurably another number."""
    rank_batches = [epoch_batches(9, 5, rank=r, world_size=2)[0] for r in (0, 1)]
    assert [len(b) for b in rank_batches] == [5, 4]
    np.testing.assert_array_equal(np.concatenate(rank_batches), epoch_batches(9, 10)[0])  # rows 0-4: rank 0's
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    common = ["--model.sync_bn=true", "--run.ckpt_every=1", "--run.max_steps=2"]
    pirl.main([*tiny_overrides(nine_shards, one), "--data.batch_size=10", *common])
    launch_two([*tiny_overrides(nine_shards, two), "--data.batch_size=5", *common], port=29522)
    expected, got = losses(one), losses(two)
    assert sorted(expected) == sorted(got) == [1, 2]

    first = loss_calls[0]  # the single process's step 1
    assert subset_loss(first, slice(None)) == pytest.approx(expected[1], rel=1e-6)
    rank_means = subset_loss(first, slice(0, 5)), subset_loss(first, slice(5, 9))
    assert abs(sum(rank_means) / 2 - expected[1]) > 1e-3 * expected[1]  # 100x the tolerance below
    assert got[1] == pytest.approx(expected[1], rel=1e-5)
    assert got[2] == pytest.approx(expected[2], rel=2e-3)  # epoch 1: another uneven step, after a weighted update
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 1)) for d in (one, two))
    assert update_error(a["model"], b["model"], initial_weights()) < 0.03


def lose_tail(shards: Path, index: int, dst: Path) -> None:
    """A copy of the shard folder where sample `index`'s JPEG is zeroed from its middle on, in place: a copy that
    never finished, with the manifest's sizes still right."""
    shutil.copytree(shards, dst)
    table = build_sample_table(dst)
    jpg = bytes(ShardReader(table).read(index).jpg)
    with open(table.tar_paths[int(table.shard[index])], "r+b") as f:
        f.seek(int(table.start[index]) + int(table.jpg_at[index]) + len(jpg) // 2)
        f.write(bytes(len(jpg) - len(jpg) // 2))


@pytest.mark.slow
def test_corrupt_sample_on_one_rank(synthetic_shards, tmp_path, loss_calls):
    """A sample of rank 1's first batch is corrupt: rank 1 trains step 1 on 3 samples, rank 0 on its 4, and both
    take the same steps. docs/troubleshooting.md: the loss is the mean over the samples that remain, a
    sample left out on another rank counted as if present, so rank 0's mean weighs 4/8 and rank 1's 3/7, at most
    1/global batch below the single process's mean over the same 7 samples."""
    rank_batches = [epoch_batches(30, 4, rank=r, world_size=2)[0] for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(rank_batches), epoch_batches(30, 8)[0])  # rows 0-3: rank 0's
    bad = int(rank_batches[1][1])
    shards, one, two = tmp_path / "shards", tmp_path / "one", tmp_path / "two"
    lose_tail(synthetic_shards, bad, shards)
    torch.set_num_threads(1)
    pirl.main([*same_run(shards, one, 1), "--run.max_steps=2"])
    done = launch_two([*same_run(shards, two, 2), "--run.max_steps=2"], port=29523)

    for out_dir in (one, two):  # counted from step 1 on, over all ranks; training went on
        assert [(r["step"], r["skipped"]) for r in read_jsonl(out_dir / "log.jsonl")] == [(1, 1), (2, 1)]
    # rank 1 alone names it (the line may share a terminal line with rank 0's progress bar)
    warnings = re.findall(r"warning: skipped .*? sample 0*(\d+) .*?: (\d+) skipped in epoch (\d+) on rank (\d+)",
                          done.stderr)
    assert warnings == [(str(bad), "1", "0", "1")], done.stderr[-3000:]
    state = checkpoint.load(checkpoint.checkpoint_path(two, 2))  # written collectively: both ranks reached it
    assert (state["step"], state["world_size"]) == (2, 2)

    first = loss_calls[0]  # the single process's step 1: rank 0's 4 samples, then rank 1's 3 left
    assert first[1]["pos_image"].shape == (7,)
    expected, got = losses(one), losses(two)
    assert subset_loss(first, slice(None)) == pytest.approx(expected[1], rel=1e-6)
    documented = 4 / 8 * subset_loss(first, slice(0, 4)) + 3 / 7 * subset_loss(first, slice(4, 7))
    assert got[1] == pytest.approx(documented, rel=1e-5)
    assert expected[1] * (1 - 1 / 8) <= got[1] < expected[1] * (1 - 1e-3)


def complete_records(log: Path) -> list[dict]:
    """The log's lines written so far, without one being written now."""
    text = log.read_text() if log.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def descendants(pid: int) -> set[int]:
    """The processes under `pid`, its children's children included."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # gone
            continue
        if stat:
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (name) state"
    family, grew = {pid}, True
    while grew:
        children = {child for child, parent in parents.items() if parent in family} - family
        family |= children
        grew = bool(children)
    return family - {pid}


def rank_pid(launcher: int, rank: int) -> int | None:
    """The training process of `rank` under the launcher: RANK in its environment, which the launcher sets."""
    for pid in sorted(descendants(launcher)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"pirl.py" in command:
            return pid
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_log_step(synthetic_shards, tmp_path):
    """SIGTERM reaches rank 1 only (a scheduler that signals one process): the flag is all-reduced on log steps,
    so both ranks stop after the same one, write one checkpoint of it and exit with status 0."""
    log_every, last_step = 2, 40
    args = [*tiny_overrides(synthetic_shards, tmp_path), "--data.batch_size=4", "--optim.epochs=10",  # 4 steps an epoch
            f"--run.log_every={log_every}", f"--run.max_steps={last_step}", "--run.ckpt_every=1000"]
    command, env = two_process_command(args, port=29524)
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not complete_records(tmp_path / "log.jsonl"):  # a step logged: both ranks have their handler set
            assert launcher.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.1)
        rank1 = rank_pid(launcher.pid, 1)
        assert rank1 is not None and rank1 != rank_pid(launcher.pid, 0)
        logged = complete_records(tmp_path / "log.jsonl")[-1]["step"]
        os.kill(rank1, signal.SIGTERM)
        status = launcher.wait(timeout=120)  # a rank that left alone would leave the other waiting in a collective
    finally:
        if launcher.poll() is None:  # the ranks run in sessions of their own: each is killed by its id
            for pid in [*descendants(launcher.pid), launcher.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.wait()
    assert status == 0, (tmp_path / "stderr").read_text()[-3000:]

    steps = [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")]
    stop = steps[-1]
    assert steps == list(range(log_every, stop + 1, log_every))
    assert logged <= stop <= logged + 2 * log_every < last_step  # the first log step after the signal, or the next
    assert f"stopped on SIGTERM after step {stop}" in (tmp_path / "stdout").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [checkpoint.checkpoint_path(tmp_path, stop).name]
    state = checkpoint.load(checkpoint.checkpoint_path(tmp_path, stop))
    assert (state["step"], state["world_size"]) == (stop, 2)


@pytest.mark.slow
def test_two_processes_on_dali_train_like_one(synthetic_shards, tmp_path):
    """DALI (CPU decoding) reads each rank's samples with the crops of the single process's batch: the same first
    loss, and the next one close."""
    pytest.importorskip("nvidia.dali")
    dali = ["--data.backend=dali", "--data.dali.decode_device=cpu"]
    two_steps_on_one_and_two_processes(synthetic_shards, tmp_path, dali, port=29525)
