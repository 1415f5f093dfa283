"""method=simclr and method=moco through train/pirl.py's loop (train/pair_methods.py): short runs log their terms,
resume reproduces the uninterrupted run, MoCo's queue holds only earlier steps' keys, its shuffled-BatchNorm keys
are the same on 1 and 2 processes, and a 2-process MoCo checkpoint continues on 1 process."""
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pirl_trainer.model.moco import MoCoNet, MomentumKeys
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config
from pirl_trainer.train.methods import LOG_TERMS, build_net
from pirl_trainer.train.pair_methods import after_step, build_momentum_keys, pair_losses, shuffled_keys
from pirl_trainer.train.run_log import read_jsonl
from tests.train.conftest import tiny_overrides
from tests.train.test_two_processes import launch_two

METHOD_CONFIGS = "train/configs/methods"
CPU = torch.device("cpu")
# 30 samples at batch 8: global batches of 8, 8, 8 and 6. A queue of 20 keys, which 8 does not divide; 2 groups.
MOCO = ["--loss.moco_queue_size=20", "--loss.moco_bn_groups=2"]


def args(method: str, shards, out_dir, *extra: str) -> list[str]:
    return ["--config", f"{METHOD_CONFIGS}/{method}.yaml", *tiny_overrides(shards, out_dir),
            *(MOCO if method == "moco" else []), *extra]


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "log.jsonl")}  # later lines win: resumed ones


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_each_pair_method_trains_logs_its_terms_and_checkpoints_its_state(synthetic_shards, tmp_path, method):
    record = pirl.main(args(method, synthetic_shards, tmp_path, "--run.max_steps=3"))
    terms = set(LOG_TERMS[method])
    assert terms == ({"loss", "pos", "accuracy"} | ({"neg"} if method == "moco" else set()))
    assert terms <= set(record) and all(torch.isfinite(torch.tensor(record[t])) for t in terms)
    assert not {"loss_image", "loss_jigsaw", "pos_image"} & set(record)
    assert 0.0 <= record["accuracy"] <= 1.0 and -1.0 <= record["pos"] <= 1.0
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert state["config"]["method"] == method and state["bank"] is None
    assert "trunk.conv1.weight" in state["model"] and "head.proj.weight" in state["model"]
    if method == "simclr":
        assert state["moco"] is None
        assert state["model"]["head.hidden.weight"].shape == (512, 512)  # ResNet-18: 512 -> 512 -> 128
        assert state["model"]["head.proj.weight"].shape == (128, 512)
    else:  # the key encoder and the queue in their own entry, not in the (DDP-wrapped) model
        assert not any(key.startswith("encoder.") for key in state["model"])
        assert state["moco"]["queue"].shape == (20, 128) and int(state["moco"]["pointer"]) == 3 * 8 % 20
        assert set(state["model"]) == {key[len("encoder."):] for key in state["moco"] if key.startswith("encoder.")}
        # the EMA moves the key encoder towards the trained query network, not onto it
        assert not torch.equal(state["moco"]["encoder.head.proj.weight"], state["model"]["head.proj.weight"])


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(synthetic_shards, tmp_path, capsys, method):
    """As the pirl test (tests/train/test_pirl_run.py): 8 steps; a run 'killed' after step 5 with only its step-3
    checkpoint left resumes there and logs the uninterrupted run's losses; the final weights and MoCo's state
    agree."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    pirl.main(args(method, synthetic_shards, full))
    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))
    pirl.main(args(method, synthetic_shards, broken, "--run.max_steps=5"))
    checkpoint.checkpoint_path(broken, 5).unlink()
    capsys.readouterr()
    pirl.main(args(method, synthetic_shards, broken, "--resume"))
    assert f"resumed from {checkpoint.checkpoint_path(broken, 3)} at step 3" in capsys.readouterr().out
    resumed = losses(broken)
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 8)) for d in (full, broken))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    if method == "moco":
        assert int(a["moco"]["pointer"]) == int(b["moco"]["pointer"]) == 60 % 20  # 2 epochs of 30 keys
        for key in a["moco"]:
            torch.testing.assert_close(a["moco"][key], b["moco"][key], rtol=1e-5, atol=1e-6)


def one_moco_step(shards, out_dir):
    cfg = load_config(PirlConfig, f"{METHOD_CONFIGS}/moco.yaml", [*tiny_overrides(shards, out_dir), *MOCO])
    one = SimpleNamespace(process_index=0, num_processes=1, device=CPU)
    loader = pirl.build_loader(cfg, one)
    loader.set_epoch(0)
    raw = next(iter(loader))
    batch = pirl.build_augment(cfg)(pirl.to_device(raw, CPU), 0)
    torch.manual_seed(0)
    net = build_net(cfg)
    keys = build_momentum_keys(cfg, net, one, loader)
    return cfg, one, loader, batch, net, keys


def test_moco_scores_the_queue_before_its_own_keys_then_enqueues_them_in_batch_order(synthetic_shards, tmp_path):
    cfg, one, loader, batch, net, keys = one_moco_step(synthetic_shards, tmp_path)
    index = batch["index"]
    before = keys.queue.clone()
    out = pair_losses(cfg, net, keys, batch["image"], batch["patches"], index, 0, nullcontext(), one, loader)
    q = net(batch["image"]).detach()  # train mode, the same batch: the same queries
    torch.testing.assert_close(out["neg"], q @ before.T)  # the queue as it was before this step
    torch.testing.assert_close(out["pos"], (q * out["keys"]).sum(dim=1))  # keys[b]: sample index[b]'s key
    # no key of this step among the negatives: no negative scores exactly the positive's similarity
    assert (out["neg"] - out["pos"][:, None]).abs().min() > 1e-4
    after_step(keys, net, out)
    assert torch.equal(keys.queue[:8], out["keys"]) and torch.equal(keys.queue[8:], before[8:])
    assert int(keys.pointer) == 8
    # the key encoder is not the query network: shuffled groups of 4 normalise the keys, not the batch of 8
    assert not torch.allclose(out["keys"], keys.encode(batch["patches"][:, 0]), atol=1e-3)


@pytest.mark.parametrize("method, override, message", [
    ("simclr", "--data.recipe.jigsaw_view=jigsaw", "method=simclr learns from the 'image' view.*methods/simclr.yaml"),
    ("moco", "--data.recipe.jigsaw_view=rotation", "method=moco learns from the 'image' view.*methods/moco.yaml"),
    ("simclr", "--data.subset_fraction=0.5", "method=simclr pretrains without labels on every sample"),
    ("moco", "--data.subset_fraction=0.5", "method=moco pretrains without labels on every sample"),
    ("simclr", "--loss.simclr_tau=0", "loss.simclr_tau must be > 0"),
    ("moco", "--loss.moco_tau=-1", "loss.moco_tau must be > 0"),
    ("moco", "--loss.moco_bn_groups=4", "fewer than 2 samples in a group at the global batch of 6"),
    ("moco", "--loss.moco_bn_groups=0", "positive multiple of the process count"),
    ("moco", "--loss.moco_queue_size=64", "exceeds the 30 samples"),
    ("moco", "--loss.moco_queue_size=7", "shorter than a global batch"),
    ("moco", "--loss.moco_momentum=1.0", r"loss.moco_momentum must be in \[0, 1\)"),
])
def test_configs_a_pair_method_cannot_train_are_config_errors(synthetic_shards, tmp_path, method, override, message):
    with pytest.raises(ConfigError, match=message):
        pirl.main(args(method, synthetic_shards, tmp_path, override, "--run.max_steps=1"))


# --- 2 processes (gloo): the shuffled-BatchNorm keys of one process ---------------------------------------------------
# 7 samples over 2 ranks, each padded to 5 rows as the loop pads to the loader's max_batch_size (B + 1): the padding
# sits after each rank's rows, inside the gathered batch
WORLD, SIZES, GROUPS, STEP = 2, (4, 3), 2, 7


def key_inputs():
    torch.manual_seed(11)
    query = MoCoNet("resnet18", embed_dim=16)
    keys = MomentumKeys(MoCoNet("resnet18", embed_dim=16), query, 8, 16, 0.999)
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    index = torch.tensor([21, 4, 17, 9, 0, 28, 13])  # global sample indexes, in the global batch's order
    cfg = SimpleNamespace(run=SimpleNamespace(seed=3, channels_last=False),
                          loss=SimpleNamespace(moco_bn_groups=GROUPS))
    return cfg, keys, images, index


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.new_empty((WORLD * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


def _key_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        cfg, keys, images, index = key_inputs()
        start, n = sum(SIZES[:rank]), SIZES[rank]
        accelerator = SimpleNamespace(num_processes=WORLD, process_index=rank, gather=_gather)
        local, in_order = shuffled_keys(cfg, keys, images[start:start + n], index[start:start + n], STEP,
                                        accelerator, max(SIZES) + 1)
        torch.save({"local": local, "in_order": in_order}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # as tests/multiprocess.py: no rank leaves while another still gathers
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing the trainer: ~5 s on an idle 2-core machine
def test_two_processes_encode_the_keys_of_one_in_its_shuffled_groups(tmp_path):
    mp.spawn(_key_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.set_num_threads(1)
    cfg, keys, images, index = key_inputs()
    one = SimpleNamespace(num_processes=1, process_index=0)
    local, in_order = shuffled_keys(cfg, keys, images, index, STEP, one, 7)
    assert torch.equal(local, in_order) and local.shape == (7, 16)
    torch.testing.assert_close(torch.cat([r["local"] for r in ranks]), local, rtol=1e-5, atol=1e-6)
    for r in ranks:  # every rank enqueues the whole global batch's keys, in its order
        torch.testing.assert_close(r["in_order"], in_order, rtol=1e-5, atol=1e-6)
    # and they are not the keys of one BatchNorm batch of all 7
    assert not torch.allclose(local, keys.encode(images), atol=1e-3)


# --- a 2-process MoCo run: N processes = 1 process, and its checkpoint continues on 1 process -------------------------
@pytest.mark.slow
def test_two_process_moco_trains_like_one_process_and_resumes_on_one(synthetic_shards, tmp_path):
    """Synchronised query BatchNorm (model.sync_bn) and the shuffled key groups: 2 processes of batch 4 log the
    1-process losses of batch 8 (the first step to float rounding, the next after one update), and the 2-process
    step-2 checkpoint, resumed on one process, logs the 2-process run's step 3."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    every_step = ["--run.ckpt_every=1", "--run.max_steps=4", "--model.sync_bn=true"]
    pirl.main(args("moco", synthetic_shards, one, "--data.batch_size=8", *every_step))
    launch_two(args("moco", synthetic_shards, two, "--data.batch_size=4", *every_step), port=29561)
    expected, got = losses(one), losses(two)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    assert got[1] == pytest.approx(expected[1], rel=1e-5)  # the same queries, keys and queue
    assert got[2] == pytest.approx(expected[2], rel=2e-3)  # after one update
    a, b = (checkpoint.load(checkpoint.checkpoint_path(d, 1)) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert int(a["moco"]["pointer"]) == int(b["moco"]["pointer"]) == 8
    torch.testing.assert_close(b["moco"]["queue"], a["moco"]["queue"], rtol=0, atol=1e-4)  # the same keys queued

    resumed = tmp_path / "two_on_one"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint.checkpoint_path(two, 2), checkpoint.checkpoint_path(resumed, 2))
    pirl.main(args("moco", synthetic_shards, resumed, "--data.batch_size=8", "--model.sync_bn=true",
                   "--run.max_steps=3", "--resume"))
    assert losses(resumed)[3] == pytest.approx(got[3], rel=1e-5)
