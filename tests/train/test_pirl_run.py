"""Few-step runs of train/pirl.py: resume continues from the checkpoint's state and reproduces the uninterrupted
run; each option changes what it should; checkpoints are safe."""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pirl_trainer.model.losses import Negatives
from pirl_trainer.model.memory_bank import MemoryBank, counter_unit_rows
from pirl_trainer.pipelines.sampler import epoch_batches
from tests.train.conftest import tiny_overrides
from pirl_trainer.train import checkpoint, linear_probe, pirl
from pirl_trainer.train.config import ConfigError
from pirl_trainer.train.methods import LOG_TERMS
from pirl_trainer.train.run_log import read_jsonl

NUM_SAMPLES, BATCH = 30, 8  # synthetic_shards with tiny_overrides: 4 steps an epoch, the last one of 6 samples


def losses_by_step(out_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "log.jsonl")}  # later lines win: the resumed ones


def samples_of_steps(*steps: int) -> torch.Tensor:
    """The samples the given steps of epoch 0 (1..4) train on: the bank rows those steps update."""
    batches = epoch_batches(NUM_SAMPLES, BATCH, seed=0, epoch=0)
    return torch.as_tensor(np.concatenate([batches[step - 1] for step in steps]))


def other_rows(rows: torch.Tensor) -> torch.Tensor:
    kept = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    kept[rows] = False
    return kept.nonzero().squeeze(1)


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(synthetic_shards, tmp_path, capsys, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")  # the `dali` extra
    full, broken = tmp_path / "full", tmp_path / "broken"
    overrides = [f"--data.backend={backend}", "--data.dali.decode_device=cpu"]
    pirl.main([*tiny_overrides(synthetic_shards, full), *overrides])  # 30 samples / batch 8: 4 steps an epoch, 8 in all
    reference = losses_by_step(full)
    assert sorted(reference) == list(range(1, 9))

    # "Killed" after step 5: only the step-3 checkpoint survives (the one at 5 is removed, as if never written).
    pirl.main([*tiny_overrides(synthetic_shards, broken), *overrides, "--run.max_steps=5"])
    checkpoint.checkpoint_path(broken, 5).unlink()
    assert checkpoint.latest_checkpoint(broken) == checkpoint.checkpoint_path(broken, 3)
    capsys.readouterr()
    pirl.main([*tiny_overrides(synthetic_shards, broken), *overrides, "--resume"])  # mid-epoch 0, into epoch 1

    # The log is appended to: a run that ignored --resume would log 1..8 again after the first run's 1..5.
    assert f"resumed from {checkpoint.checkpoint_path(broken, 3)} at step 3" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(broken / "log.jsonl")] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    resumed = losses_by_step(broken)
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    a = checkpoint.load(checkpoint.checkpoint_path(full, 8))
    b = checkpoint.load(checkpoint.checkpoint_path(broken, 8))
    torch.testing.assert_close(a["bank"]["rows"], b["bank"]["rows"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bank", ["replicated", "sharded"])
def test_resume_starts_from_the_checkpoints_optimiser_and_bank_state(synthetic_shards, tmp_path, capsys, bank):
    """Seeded runs are deterministic: a run that retrained from step 1 would rebuild the saved momentum and bank
    exactly. So the step-3 checkpoint is given bank rows and momentum buffers that no run produces, and one step
    is resumed from it twice, with those buffers and with zero buffers. The rows the step does not update must
    stay as altered, the ones it updates must move from the altered rows (EMA weight 0.5: cosine ~0.7 to them),
    and each buffer must be 0.9 x the altered one plus this step's gradient term, which the zero-buffer resume
    measures (a buffer the optimiser started afresh would be that term alone)."""
    runs = {"altered": tmp_path / "altered", "zero": tmp_path / "zero"}
    args = {name: [*tiny_overrides(synthetic_shards, out), f"--loss.bank={bank}"] for name, out in runs.items()}
    pirl.main([*args["altered"], "--run.max_steps=3"])
    shutil.copytree(runs["altered"], runs["zero"])
    state = checkpoint.load(checkpoint.checkpoint_path(runs["altered"], 3))
    generator = torch.Generator().manual_seed(1234)
    rows = state["bank"]["rows"] = F.normalize(torch.randn(NUM_SAMPLES, 128, generator=generator), dim=1)
    momentum = {key: 10 * torch.randn(slot["momentum_buffer"].shape, generator=generator)
                for key, slot in state["optimizer"]["state"].items()}
    for name, scale in (("altered", 1.0), ("zero", 0.0)):
        for key, slot in state["optimizer"]["state"].items():
            slot["momentum_buffer"] = scale * momentum[key]
        checkpoint.save_atomic(state, checkpoint.checkpoint_path(runs[name], 3))
        capsys.readouterr()
        pirl.main([*args[name], "--run.max_steps=4", "--resume"])
        assert f"resumed from {checkpoint.checkpoint_path(runs[name], 3)} at step 3" in capsys.readouterr().out
        assert [r["step"] for r in read_jsonl(runs[name] / "log.jsonl")] == [1, 2, 3, 4]

    after, gradient_term = (checkpoint.load(checkpoint.checkpoint_path(runs[name], 4)) for name in ("altered", "zero"))
    updated = samples_of_steps(4)
    kept = other_rows(updated)
    assert torch.equal(after["bank"]["rows"][kept], rows[kept])
    cosine = (after["bank"]["rows"][updated] * rows[updated]).sum(dim=1)
    assert cosine.min() > 0.5 and cosine.max() < 1 - 1e-3, cosine
    assert set(after["optimizer"]["state"]) == set(momentum)
    for key, altered in momentum.items():
        expected = 0.9 * altered + gradient_term["optimizer"]["state"][key]["momentum_buffer"]
        torch.testing.assert_close(after["optimizer"]["state"][key]["momentum_buffer"], expected,
                                   msg=lambda text, key=key: f"momentum buffer of parameter {key}: {text}")


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


class TwoStepRun:
    """A 2-step run: its log records, final checkpoint, and what each step handed to pirl_loss (copied when
    handed over: the bank rows change in place after the step)."""

    def __init__(self, shards, out_dir, overrides, monkeypatch):
        self.inputs = []
        loss = pirl.pirl_loss

        def recording(bank_pos, g_jig, f_img, bank_neg, **kwargs):
            neg = bank_neg.table[bank_neg.ids] if isinstance(bank_neg, Negatives) else bank_neg  # (B, K, D)
            self.inputs.append({"pos": bank_pos.float().clone(), "neg": neg.float().clone(),
                                "jigsaw": g_jig.detach().clone(), "image": f_img.detach().clone(), **kwargs})
            return loss(bank_pos, g_jig, f_img, bank_neg, **kwargs)

        monkeypatch.setattr(pirl, "pirl_loss", recording)
        self.record = pirl.main([*tiny_overrides(shards, out_dir), "--run.max_steps=2", *overrides])
        self.log = read_jsonl(out_dir / "log.jsonl")
        self.state = checkpoint.load(checkpoint.latest_checkpoint(out_dir))
        assert [r["step"] for r in self.log] == [1, 2] and self.record == self.log[-1]
        assert all(math.isfinite(r[key]) for r in self.log for key in LOG_TERMS["pirl"])


@pytest.fixture(scope="module")
def two_step_run(synthetic_shards, tmp_path_factory):
    """run(*overrides) -> TwoStepRun, each configuration run once per module: the option tests compare runs."""
    runs = {}

    def run(*overrides):
        if overrides not in runs:
            with pytest.MonkeyPatch.context() as monkeypatch:
                runs[overrides] = TwoStepRun(synthetic_shards, tmp_path_factory.mktemp("run"), overrides, monkeypatch)
        return runs[overrides]

    return run


def test_default_two_step_run_logs_its_throughput(two_step_run):
    record = two_step_run().record
    assert 0.0 <= record["data_wait_frac"] <= 1.0 and record["img_per_s"] > 0
    assert record["loss"] == pytest.approx(0.5 * (record["loss_jigsaw"] + record["loss_image"]), rel=1e-6)


def test_lam_0_trains_on_the_image_term_alone(two_step_run):
    """loss = lam * loss_jigsaw + (1 - lam) * loss_image (eq. 5); step 1 scores the same embeddings as the default."""
    default, npid = two_step_run().log, two_step_run("--loss.lam=0").log
    assert [r["loss"] for r in npid] == [r["loss_image"] for r in npid]
    assert all(r["loss_jigsaw"] != r["loss_image"] for r in npid)  # still reported, weighted 0
    assert npid[0]["loss_image"] == default[0]["loss_image"] and default[0]["loss"] != default[0]["loss_image"]


def test_infonce_logs_the_softmax_cross_entropy_of_the_same_similarities(two_step_run):
    """Step 1 (the same weights, batch and bank in both runs) logs the NCE run's similarities and, per term,
    mean_b [logsumexp(s_b / tau) - s_b0 / tau] over [positive, negatives], computed here from the inputs."""
    run, default = two_step_run("--loss.kind=infonce"), two_step_run()
    record, step = run.log[0], run.inputs[0]
    for term in ("image", "jigsaw"):
        query = step[term]
        sims = torch.cat([(query * step["pos"]).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", query, step["neg"])],
                         dim=1) / step["tau"]
        expected = (torch.logsumexp(sims, dim=1) - sims[:, 0]).mean().item()
        assert record[f"loss_{term}"] == pytest.approx(expected, rel=1e-5), term
        assert record[f"loss_{term}"] != pytest.approx(default.log[0][f"loss_{term}"], rel=1e-2), term
    assert (record["pos_image"], record["neg_image"]) == (default.log[0]["pos_image"], default.log[0]["neg_image"])


def test_shared_negatives_are_one_draw_for_the_whole_batch_outside_it(two_step_run):
    """Step 1 scores the default's positives against other negatives: the same K rows for every sample, none
    of them a row of the batch; the default's per-sample draws differ between samples."""
    shared, default = two_step_run("--loss.shared_negatives=true"), two_step_run()
    for step in shared.inputs:
        neg = step["neg"]
        assert torch.equal(neg, neg[:1].expand_as(neg))
        assert not (neg[0] @ step["pos"].T > 1 - 1e-6).any()  # unit rows: cosine 1 only for the same row
    assert not torch.equal(default.inputs[0]["neg"][0], default.inputs[0]["neg"][1])
    assert shared.log[0]["pos_image"] == default.log[0]["pos_image"]
    assert shared.log[0]["neg_image"] != default.log[0]["neg_image"]
    assert shared.log[0]["loss"] != pytest.approx(default.log[0]["loss"], rel=1e-3)


def test_sharded_bank_on_one_process_trains_like_a_replicated_one_bit_for_bit(two_step_run, synthetic_shards,
                                                                              tmp_path, monkeypatch):
    """A sharded bank starts from counter rows (row i a function of (seed, i)), a replicated one from the
    global RNG; given the same counter rows, the replicated bank must give the same losses and rows exactly."""
    sharded = two_step_run("--loss.bank=sharded", "--loss.shared_negatives=true")
    untouched = other_rows(samples_of_steps(1, 2))  # still the initial rows
    rows = sharded.state["bank"]["rows"]
    assert torch.equal(rows[untouched], counter_unit_rows(0, untouched, 128))
    assert not torch.equal(two_step_run().state["bank"]["rows"][untouched], rows[untouched])

    def counter_rows_bank(cfg, num_rows, device):
        return MemoryBank(num_rows, cfg.model.embed_dim, init_seed=cfg.run.seed).to(device)

    monkeypatch.setattr(pirl, "build_bank", counter_rows_bank)
    replicated = TwoStepRun(synthetic_shards, tmp_path, ["--loss.shared_negatives=true"], monkeypatch)
    for a, b in zip(sharded.log, replicated.log):
        assert {k: a[k] for k in LOG_TERMS["pirl"]} == {k: b[k] for k in LOG_TERMS["pirl"]}
    assert torch.equal(rows, replicated.state["bank"]["rows"])


@pytest.mark.parametrize("dtype, bank", [("bfloat16", "replicated"), ("float16", "sharded")])
def test_bank_dtype_stores_the_rows_in_that_dtype(two_step_run, dtype, bank):
    """The float32 bank's initial rows of that kind, rounded; step 1's positive similarities within the rounding."""
    run = two_step_run(f"--loss.bank_dtype={dtype}", f"--loss.bank={bank}")
    reference = two_step_run() if bank == "replicated" else two_step_run("--loss.bank=sharded",
                                                                         "--loss.shared_negatives=true")
    rows, untouched = run.state["bank"]["rows"], other_rows(samples_of_steps(1, 2))
    assert rows.dtype == getattr(torch, dtype)
    assert torch.equal(rows[untouched], reference.state["bank"]["rows"][untouched].to(rows.dtype))
    assert run.log[0]["pos_image"] == pytest.approx(reference.log[0]["pos_image"], abs=1e-3)


def test_channels_last_trains_the_same_network_in_that_layout(two_step_run):
    default, run = two_step_run(), two_step_run("--run.channels_last=true")
    weight = run.state["model"]["trunk.conv1.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert default.state["model"]["trunk.conv1.weight"].is_contiguous()
    for a, b in zip(default.log, run.log):
        for key in LOG_TERMS["pirl"]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_bf16_autocast_stays_within_bf16_rounding_of_float32(two_step_run):
    """Step 1 (same weights, batch and bank): close to the float32 loss, but not equal to it as an ignored
    autocast would be (float32 layouts differ by ~1e-6, bf16 rounding by ~1e-2)."""
    default, run = two_step_run().log[0], two_step_run("--run.bf16=true").log[0]
    for key in ("loss", "loss_jigsaw", "loss_image"):
        assert 1e-4 < abs(run[key] / default[key] - 1) < 3e-2, key


def test_bank_init_features_starts_the_bank_near_the_embeddings(two_step_run):
    """Random rows have cosine ~0 to an embedding; rows that are the initial embeddings of the same images
    (centre crops, not the training views) are far closer."""
    assert abs(two_step_run().log[0]["pos_image"]) < 0.1
    assert two_step_run("--loss.bank_init=features").log[0]["pos_image"] > 0.3


@pytest.mark.parametrize("view", [
    ["--data.recipe.jigsaw_view=rotation"], ["--data.recipe.jigsaw_view=rotation_jigsaw"],
    ["--data.recipe.patch_rotation=true", "--data.recipe.patch_flip_p=0.5"],
])
def test_jigsaw_view_options_change_the_transformed_view_only(two_step_run, view):
    """Step 1's jigsaw term scores another It; the image term is the default's (the image view and the weights
    are the same), except for the rotation view, whose single tile gives the jigsaw head another shape."""
    default, run = two_step_run(), two_step_run(*view)
    assert run.log[0]["loss_jigsaw"] != pytest.approx(default.log[0]["loss_jigsaw"], rel=1e-3)
    if view == ["--data.recipe.jigsaw_view=rotation"]:
        assert "jigsaw_head.mix.weight" in default.state["model"]
        assert run.state["model"]["jigsaw_head.proj.weight"].shape == (128, 512)
        assert "jigsaw_head.mix.weight" not in run.state["model"]
    else:
        assert run.log[0]["loss_image"] == default.log[0]["loss_image"]
        assert not torch.equal(run.inputs[0]["jigsaw"], default.inputs[0]["jigsaw"])


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


def test_more_negatives_than_the_data_holds_is_a_config_error_before_training(synthetic_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"loss.num_negatives = 30 does not fit .* \(30 samples\): .*only 29 rows"):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--loss.num_negatives=30", "--loss.bank_init=features"])
    assert not (tmp_path / checkpoint.CHECKPOINT_DIR).exists()
