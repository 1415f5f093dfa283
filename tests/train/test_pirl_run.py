"""Few-step runs of train/pirl.py: resume reproduces the uninterrupted run; variants run; checkpoints are safe."""
import pytest
import torch

from tests.train.conftest import tiny_overrides
from train import checkpoint, linear_probe, pirl
from train.config import ConfigError
from train.run_log import read_jsonl


def losses_by_step(out_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "log.jsonl")}  # later lines win: the resumed ones


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(synthetic_shards, tmp_path, backend):
    full, broken = tmp_path / "full", tmp_path / "broken"
    overrides = [f"--data.backend={backend}", "--data.dali.decode_device=cpu"]
    pirl.main([*tiny_overrides(synthetic_shards, full), *overrides])  # 30 samples / batch 8: 4 steps an epoch, 8 in all
    reference = losses_by_step(full)
    assert sorted(reference) == list(range(1, 9))

    # "Killed" after step 5: only the step-3 checkpoint survives (the one at 5 is removed, as if never written).
    pirl.main([*tiny_overrides(synthetic_shards, broken), *overrides, "--run.max_steps=5"])
    checkpoint.checkpoint_path(broken, 5).unlink()
    assert checkpoint.latest_checkpoint(broken) == checkpoint.checkpoint_path(broken, 3)
    pirl.main([*tiny_overrides(synthetic_shards, broken), *overrides, "--resume"])  # mid-epoch 0, into epoch 1

    resumed = losses_by_step(broken)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    a = checkpoint.load(checkpoint.checkpoint_path(full, 8))
    b = checkpoint.load(checkpoint.checkpoint_path(broken, 8))
    torch.testing.assert_close(a["bank"]["rows"], b["bank"]["rows"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_the_restart_state_and_loads_weights_only(synthetic_shards, tmp_path):
    pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--optim.epochs=1"])
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert {"model", "bank", "optimizer", "scheduler", "rng", "config", "step", "epoch", "step_in_epoch"} <= set(state)
    assert state["bank"]["rows"].shape == (30, 128)
    torch.testing.assert_close(state["bank"]["rows"].norm(dim=1), torch.ones(30))
    assert state["config"]["data"]["recipe"]["image_size"] == 32
    assert (tmp_path / "config.yaml").read_text().count("image_size: 32") == 1
    assert not list((tmp_path / checkpoint.CHECKPOINT_DIR).glob("*.tmp"))


def test_untrusted_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RuntimeError, match="evil.pt"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "variant",
    [
        ["--loss.kind=infonce"], ["--loss.shared_negatives=true"], ["--loss.lam=0"], ["--run.bf16=true"],
        ["--loss.bank_init=features"], ["--run.channels_last=true"],
        ["--data.recipe.jigsaw_view=rotation"], ["--data.recipe.jigsaw_view=rotation_jigsaw"],
        ["--data.recipe.patch_rotation=true", "--data.recipe.patch_flip_p=0.5"],
        ["--loss.bank=sharded", "--loss.shared_negatives=true"], ["--loss.bank_dtype=bfloat16"],
        ["--loss.bank_dtype=float16", "--loss.bank=sharded"],
    ],
)
def test_variants_run_and_log_finite_losses(synthetic_shards, tmp_path, variant):
    record = pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--run.max_steps=2", *variant])
    assert record["step"] == 2 and record["loss"] == pytest.approx(record["loss"])  # finite, not NaN
    assert 0.0 <= record["data_wait_frac"] <= 1.0 and record["img_per_s"] > 0


def test_linear_probe_reads_the_checkpoint(synthetic_shards, tmp_path):
    pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--run.max_steps=2"])
    result = linear_probe.main([
        f"--checkpoint={checkpoint.latest_checkpoint(tmp_path)}", f"--train_shards={synthetic_shards}",
        f"--test_shards={synthetic_shards}", "--num_workers=0", "--epochs=30", f"--output={tmp_path}/probe.json",
    ])
    assert result["num_train"] == result["num_test"] == 30 and result["num_classes"] == 10
    assert result["image_size"] == 32 and result["feature_dims"]["res5"] == 512
    assert result["train_top1"] > 50.0  # 30 points in 512 dimensions are separable: the classifier must fit them
    assert (tmp_path / "probe.json").exists()


def test_bank_init_from_features_fills_every_row_with_the_initial_embedding(synthetic_shards, tmp_path):
    """Random unit rows in 128-d have a mean pairwise cosine near 0 (|mean| < 0.05 for 30 rows); rows that
    hold embeddings of one initial network share a direction (measured ~0.7)."""
    pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--loss.bank_init=features", "--run.max_steps=1"])
    rows = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))["bank"]["rows"]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(30))
    cos = rows @ rows.T
    assert cos[~torch.eye(30, dtype=bool)].mean() > 0.3


def test_precise_bn_sets_running_stats_to_the_exact_data_mean():
    torch.manual_seed(0)
    trunk, _ = linear_probe.build_trunk("resnet18")
    batches = [{"image": torch.randn(4, 3, 32, 32) * 2 + 1} for _ in range(3)]
    linear_probe.recalibrate_batchnorm(trunk, [b["image"] for b in batches])
    assert not trunk.training
    with torch.no_grad():
        conv1 = torch.cat([trunk.conv1(b["image"]) for b in batches])  # (12, 64, 16, 16)
    torch.testing.assert_close(trunk.bn1.running_mean, conv1.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_unknown_augment_kernels_is_a_config_error(synthetic_shards, tmp_path):
    with pytest.raises(ConfigError, match="data.augment_kernels must be one of"):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--data.augment_kernels=gpu"])


@pytest.mark.parametrize("override, message", [
    ("--data.backend=tfrecord", "data.backend must be one of"),
    ("--data.dali.decode_device=gpu", "data.dali.decode_device must be one of"),
    ("--data.dali.hw_decoder_load=1.5", "data.dali.hw_decoder_load must be in"),
    ("--loss.bank=distributed", "loss.bank must be one of"),
    ("--loss.bank_dtype=float64", "loss.bank_dtype must be one of"),
])
def test_bad_backend_settings_are_config_errors(synthetic_shards, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path), override])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(synthetic_shards, tmp_path):
    # An absurd learning rate turns the weights into inf/NaN after a few updates; logs every 3 steps,
    # checkpoints every step: the check before each checkpoint must catch the NaN between log steps.
    args = [*tiny_overrides(synthetic_shards, tmp_path), "--optim.lr=1e30", "--optim.final_lr=1e30",
            "--run.log_every=3", "--run.ckpt_every=1"]
    with pytest.raises(pirl.NonFiniteLoss, match=r"non-finite loss in step.*loss.*last good checkpoint is .*step_"):
        pirl.main(args)
    latest = checkpoint.latest_checkpoint(tmp_path)
    state = checkpoint.load(latest)  # intact and loadable
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert torch.isfinite(state["bank"]["rows"]).all()


def test_a_checkpoint_write_that_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    import errno

    first = checkpoint.checkpoint_path(tmp_path, 3)
    checkpoint.save_atomic({"step": 3, "w": torch.ones(4)}, first)

    def disk_full(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    second = checkpoint.checkpoint_path(tmp_path, 6)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step_000000006.pt: No space left.*step_000000003.pt"):
        checkpoint.save_atomic({"step": 6}, second)
    assert not second.exists() and not list(second.parent.glob("*.tmp"))  # nothing partial left to be taken
    assert checkpoint.latest_checkpoint(tmp_path) == first
    assert checkpoint.load(first)["step"] == 3
