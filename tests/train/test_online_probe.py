"""The online linear probe (train/online_probe.py, `train/linear_probe.py --mode=online`) on the synthetic shards:
frozen trunk, trained heads, its schedule, exact resume, exactly-once scoring over two processes, and the result's
keys; plus the cached probe's refusal of features that do not fit in memory."""
import copy
import json
import os
import signal
import subprocess

import pytest
import torch

from pirl_trainer.pipelines.class_index import ClassIndexMismatch
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.tools.synthetic_data import write_synthetic
from pirl_trainer.train import checkpoint, linear_probe, online_probe
from pirl_trainer.train.config import ConfigError
from pirl_trainer.train.run_log import read_jsonl
from tests.train.test_knn_monitor import SYNTHETIC_CLASSES, relabelled_copy
from tests.train.test_linear_probe import RESNET18_DIMS
from tests.train.test_two_processes import REPO, two_process_command

# synthetic_shards at batch 8: 4 steps an epoch (the last one of 6 images), 8 in the 2-epoch runs below
STEPS_PER_EPOCH, PEAK_LR = 4, 0.01 * 8 / 256  # Goyal et al.'s 0.01 at batch 256, scaled to the global batch of 8


def online_args(shards, out_dir, *extra, test_shards=None):
    return ["--mode=online", f"--train_shards={shards}", f"--test_shards={test_shards or shards}",
            "--arch=resnet18", "--image_size=32", "--num_workers=0", "--batch_size=8", "--online_epochs=2",
            "--online_log_every=1", "--online_ckpt_every=3", "--online_tensorboard=false", "--online_cpu=true",
            f"--online_out_dir={out_dir}", *extra]


def records(out_dir, prefix: str) -> dict[tuple[int, str], float]:
    """{(step, key): value} of the logged keys starting with prefix; later lines win (the resumed ones)."""
    return {(r["step"], k): v for r in read_jsonl(out_dir / "log.jsonl") for k, v in r.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory):
    """The synthetic images less one: 29, which neither 2 ranks nor a batch of 4 divide."""
    root = tmp_path_factory.mktemp("odd")
    write_synthetic(root / "images", per_class=3, size=64, seed=0)
    sorted(p for p in (root / "images").rglob("*") if p.is_file())[0].unlink()
    build_shards(root / "images", root / "shards", workers=1, shard_size=40_000)
    return root / "shards"


def test_heads_of_every_stage_learn_and_the_trunk_stays_bit_identical(synthetic_shards, tmp_path, monkeypatch):
    loaded = {}

    def load_and_keep(cfg):
        trunk, arch, recipe = linear_probe.load_trunk(cfg)
        loaded.update(trunk=trunk, before=copy.deepcopy(trunk.state_dict()))
        return trunk, arch, recipe

    monkeypatch.setattr(online_probe, "load_trunk", load_and_keep)
    no_decay = "--online_weight_decay=0"  # every change of a head's weights is then its gradient's doing
    linear_probe.main(online_args(synthetic_shards, tmp_path / "init", no_decay, "--online_max_steps=0"))
    linear_probe.main(online_args(synthetic_shards, tmp_path / "run", no_decay, "--online_epochs=1"))

    trunk, before = loaded["trunk"], loaded["before"]
    after = trunk.state_dict()
    assert any("running_mean" in k for k in after) and after.keys() == before.keys()
    for key, value in before.items():  # weights, BatchNorm running statistics and their batch counts
        assert torch.equal(after[key], value), key
    assert all(p.grad is None and not p.requires_grad for p in trunk.parameters())

    start = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "init", 0))["heads"]
    end = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run", STEPS_PER_EPOCH))["heads"]
    for stage, dims in RESNET18_DIMS.items():
        head = f"heads.{stage}"
        assert end[f"{head}.1.weight"].shape == (10, dims)  # BatchNorm1d is module 0, Linear module 1
        assert not torch.equal(end[f"{head}.1.weight"], start[f"{head}.1.weight"]), stage
        assert not torch.equal(end[f"{head}.1.bias"], start[f"{head}.1.bias"]), stage
        assert int(end[f"{head}.0.num_batches_tracked"]) == STEPS_PER_EPOCH  # training mode: batch statistics
        assert f"{head}.0.weight" not in end  # affine=False


def test_milestones_are_goyal_et_al_s_scaled_to_the_configured_epochs():
    cfg = linear_probe.ProbeConfig()
    assert (cfg.online_epochs, cfg.online_lr_milestones, cfg.online_lr_decay) == (28, [8, 16, 24], 0.1)
    assert (cfg.online_lr, cfg.online_reference_batch, cfg.online_momentum, cfg.online_weight_decay) == (
        0.01, 256, 0.9, 5e-4)
    assert online_probe.milestone_steps(cfg, 100) == [800, 1600, 2400]  # after epochs 8, 16 and 24 of 28
    optimizer, scheduler = online_probe.build_optimizer(cfg, [torch.zeros(1, requires_grad=True)], 100, 512)
    lrs = []
    for step in range(2800):  # the rate each step trains with
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = 0.01 * 512 / 256
    assert [lrs[s] for s in (0, 799, 800, 1599, 1600, 2399, 2400, 2799)] == pytest.approx(
        [peak, peak, peak / 10, peak / 10, peak / 100, peak / 100, peak / 1000, peak / 1000])
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4
    assert online_probe.milestone_steps(linear_probe.ProbeConfig(online_epochs=14), 100) == [400, 800, 1200]
    assert online_probe.milestone_steps(linear_probe.ProbeConfig(online_epochs=2), 4) == [2, 5, 7]  # rounded


def test_killed_and_resumed_run_logs_the_uninterrupted_runs_accuracies(synthetic_shards, tmp_path, capsys):
    full, broken = tmp_path / "full", tmp_path / "broken"
    expected = linear_probe.main(online_args(synthetic_shards, full))
    # the rate each step trained with: 0.01 x 8/256, x0.1 from steps 2, 5 and 7 (0-based; milestone_steps)
    lrs = {step: r["lr"] for step, r in ((r["step"], r) for r in read_jsonl(full / "log.jsonl")) if "lr" in r}
    assert lrs == pytest.approx({1: PEAK_LR, 2: PEAK_LR, 3: PEAK_LR / 10, 4: PEAK_LR / 10, 5: PEAK_LR / 10,
                                 6: PEAK_LR / 100, 7: PEAK_LR / 100, 8: PEAK_LR / 1000})
    assert sorted({step for step, _ in records(full, "test_top1/")}) == [4, 8]  # the end of each epoch

    # "Killed" after step 5: only the step-3 checkpoint survives; then resumed mid-epoch 0 into epoch 1.
    linear_probe.main(online_args(synthetic_shards, broken, "--online_max_steps=5"))
    checkpoint.checkpoint_path(broken, 5).unlink()
    capsys.readouterr()
    resumed = linear_probe.main([*online_args(synthetic_shards, broken), "--resume"])
    assert f"resumed from {checkpoint.checkpoint_path(broken, 3)} at step 3" in capsys.readouterr().out
    train_steps = [r["step"] for r in read_jsonl(broken / "log.jsonl") if "lr" in r]
    assert train_steps == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # appended to, from the checkpoint's step on
    for prefix in ("train_top1/", "loss/", "test_top1/", "test_top5/"):
        reference, got = records(full, prefix), records(broken, prefix)
        assert reference and reference == pytest.approx({k: got[k] for k in reference}, rel=1e-5, abs=1e-6), prefix
    # running training top-1 of the resumed epoch 0 counts its steps 1-3 too (kept in the checkpoint)
    key = (4, "train_top1/res5")
    assert records(broken, "train_top1/")[key] == records(full, "train_top1/")[key]
    assert resumed["per_layer"] == pytest.approx(expected["per_layer"], rel=1e-5)
    assert resumed["per_layer_train"] == pytest.approx(expected["per_layer_train"], rel=1e-5)
    assert json.loads((broken / "probe.json").read_text()) == resumed


@pytest.mark.slow
def test_two_ranks_score_every_test_image_once_as_one_process_does(odd_shards, tmp_path):
    """29 images over 2 ranks in batches of 4: each rank scores its share of the test shards (15 and 14 images),
    the counts summed. The 2-process run's heads, scored by one process, give the same hits."""
    out = tmp_path / "two"
    args = online_args(odd_shards, out, "--batch_size=4", "--online_epochs=1")
    command, env = two_process_command(args, port=29531)
    command[command.index(str(REPO / "train" / "pirl.py"))] = str(REPO / "train" / "linear_probe.py")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    state = checkpoint.load(checkpoint.checkpoint_path(out, 4))  # ceil(29 // 2 / 4) steps
    assert (state["world_size"], state["global_batch"], result["num_test"], result["num_train"]) == (2, 8, 29, 29)
    assert int(state["train_counts"][-1]) == 29  # the ranks' training images, each once

    cfg = linear_probe.ProbeConfig(arch="resnet18", image_size=32, num_workers=0, batch_size=8)
    trunk, _, recipe = linear_probe.load_trunk(cfg)  # the run's random trunk (seed 0)
    heads = online_probe.StageHeads(RESNET18_DIMS, 10)
    heads.load_state_dict(state["heads"])
    counts = online_probe.evaluate(trunk, heads, linear_probe.eval_loader(str(odd_shards), recipe, cfg), recipe,
                                   torch.device("cpu"))
    assert counts[:, 2].tolist() == [29] * 4
    assert result["per_layer"] == dict(zip(RESNET18_DIMS, online_probe.percent(counts[:, 0], 29)))
    assert result["per_layer_top5"] == dict(zip(RESNET18_DIMS, online_probe.percent(counts[:, 1], 29)))
    tests = [r for r in read_jsonl(out / "log.jsonl") if "num_test" in r]
    assert [(r["step"], r["num_test"]) for r in tests] == [(4, 29)]  # written once, by rank 0


def test_the_result_has_the_cached_probes_keys(synthetic_shards, tmp_path):
    cached = linear_probe.main([f"--train_shards={synthetic_shards}", f"--test_shards={synthetic_shards}",
                                "--arch=resnet18", "--image_size=32", "--num_workers=0", "--epochs=1",
                                "--weight_decays=[0.1]", "--layers=[res3,res5]"])
    online = linear_probe.main(online_args(synthetic_shards, tmp_path, "--online_max_steps=2", "--layers=[res3,res5]"))
    assert online.keys() == cached.keys()
    for key, value in cached.items():
        if isinstance(value, dict) and key != "settings":
            assert online[key].keys() == value.keys() == {"res3", "res5"}, key
    assert (cached["mode"], online["mode"], online["bn"]) == ("cached", "online", "running")
    for result in (cached, online):
        assert result["top1"] == result["per_layer"][result["best_layer"]]
        assert result["top5"] == result["per_layer_top5"][result["best_layer"]]
        assert all(result["per_layer_top5"][k] >= result["per_layer"][k] for k in ("res3", "res5"))
        assert result["feature_dims"] == {"res3": RESNET18_DIMS["res3"], "res5": RESNET18_DIMS["res5"]}
    assert online["num_test"] == 30 and all(round(v * 0.3, 6).is_integer() for v in online["per_layer"].values())
    assert online["settings"]["global_batch"] == 8 and online["weight_decay"] == {"res3": 5e-4, "res5": 5e-4}


def test_shards_with_other_classes_are_refused_before_any_step(synthetic_shards, tmp_path, monkeypatch):
    test = relabelled_copy(synthetic_shards, tmp_path / "test", [*SYNTHETIC_CLASSES[:9], "triangle_open"])

    def no_heads(*args):
        raise AssertionError("heads built before the classes were compared")

    monkeypatch.setattr(online_probe, "stage_dims", no_heads)
    with pytest.raises(ClassIndexMismatch, match=(
            f"online linear probe: training shards {synthetic_shards} and test shards {test} have different class "
            "indexes: class 9 is 'triangle_outline' in the training shards and 'triangle_open' in the test shards")):
        linear_probe.main(online_args(synthetic_shards, tmp_path / "run", test_shards=test))


@pytest.mark.parametrize("extra, match", [
    (["--mode=streaming"], "mode must be one of"),
    (["--resume"], "--resume continues an online probe"),  # the cached mode has nothing to resume
    (["--mode=online", "--online_lr_milestones=[8,30]"], "online_lr_milestones must be"),
    (["--mode=online", "--online_eval_every=0"], "online_eval_every must be >= 1"),
    (["--mode=online", "--online_train_view=center"], "online_train_view must be one of"),
    (["--mode=online", "--online_train_view=centre", "--backend=dali"], "DALI's eval order is its own"),
])
def test_bad_mode_settings_are_config_errors(synthetic_shards, extra, match):
    with pytest.raises(ConfigError, match=match):
        linear_probe.main([f"--train_shards={synthetic_shards}", f"--test_shards={synthetic_shards}", *extra])


def test_the_training_crops_are_goyals_whatever_the_trunk_was_pretrained_on():
    from pirl_trainer.pipelines.recipe import PirlRecipe

    moco = PirlRecipe(image_size=48, jigsaw_view="image", image_scale_min=0.2, ratio_min=0.9, flip_p=0.3, blur_p=0.5)
    view = online_probe.train_view_recipe(moco)
    assert (view.image_scale_min, view.image_scale_max, view.ratio_min, view.ratio_max) == (0.08, 1.0, 3 / 4, 4 / 3)
    assert (view.flip_p, view.blur_p, view.image_size, view.jigsaw_view, view.view_tiles) == (0.5, 0.0, 48, "jigsaw", 1)


def test_resume_help_names_the_online_out_dir(capsys):
    with pytest.raises(SystemExit):
        linear_probe.main(["--help"])
    assert "latest checkpoint in online_out_dir" in " ".join(capsys.readouterr().out.split())


def test_the_centre_train_view_is_the_eval_view_shuffled_once_per_epoch(synthetic_shards):
    """online_train_view=centre trains on what the cached probe fits: each training image's eval view (the same
    pixels as the test loader's form), every sample once per epoch, in a shuffled order that changes per epoch."""
    cfg = linear_probe.ProbeConfig(arch="resnet18", image_size=32, num_workers=0, batch_size=8,
                                   train_shards=str(synthetic_shards), online_train_view="centre")
    recipe = linear_probe.load_trunk(cfg)[2]
    loader = online_probe.train_images(cfg, recipe, 0, 1)
    reference = {int(i): img for batch in linear_probe.eval_loader(str(synthetic_shards), recipe, cfg)
                 for i, img in zip(batch["index"], batch["image"])}
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order = []
        for batch in loader:
            order += batch["index"].tolist()
            for i, img in zip(batch["index"].tolist(), batch["image"]):
                assert torch.equal(img, reference[i])
        assert sorted(order) == sorted(reference)
        orders.append(order)
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]


@pytest.mark.parametrize("fast", [False, True], ids=["float32", "bf16_channels_last"])
def test_the_heads_step_and_the_scoring_run_on_cuda_without_host_reads(synthetic_shards, monkeypatch, fast):
    """Dry run in fake CUDA tensors (tests/train/test_fake_cuda.py): no CPU tensor meets a CUDA one, and neither the
    heads' losses and hits nor the scoring loop read a device value on the host; also with the trunk's forward in
    bf16 autocast and channels_last."""
    from tests.train.test_fake_cuda import (CUDA, HostRealMode, assert_on_cuda, bf16_autocast_without_a_gpu,
                                            to_fake_cuda)

    cfg = linear_probe.ProbeConfig(arch="resnet18", image_size=32, num_workers=0, batch_size=8)
    trunk, _, recipe = linear_probe.load_trunk(cfg)
    if fast:
        trunk = trunk.to(memory_format=torch.channels_last)
    loader = linear_probe.eval_loader(str(synthetic_shards), recipe, cfg)
    options = {"bf16": fast, "channels_last": fast}
    mode = HostRealMode()
    with bf16_autocast_without_a_gpu(monkeypatch), mode:
        heads = to_fake_cuda(online_probe.StageHeads(RESNET18_DIMS, 10), mode)
        to_fake_cuda(trunk, mode)
        image, label = torch.zeros(8, 3, 32, 32, device=CUDA), torch.zeros(8, dtype=torch.int64, device=CUDA)
        feats = online_probe.frozen_features(trunk, image, list(RESNET18_DIMS), **options)
        losses, hits = online_probe.head_losses(heads, feats, label, list(RESNET18_DIMS))
        counts = online_probe.evaluate(trunk, heads, loader, recipe, CUDA, **options)
    assert_on_cuda(losses, hits, counts, *feats.values())
    assert all(f.dtype == torch.float32 for f in feats.values())
    assert losses.shape == hits.shape == (4,) and counts.shape == (4, 3) and counts.dtype == torch.int64


class Extracted(Exception):
    """Raised in place of the cached probe's feature extraction: the memory check let it through."""


def test_cached_probe_refuses_features_larger_than_the_available_memory(synthetic_shards, monkeypatch):
    def extract(*args):
        raise Extracted

    monkeypatch.setattr(linear_probe, "extract", extract)
    need = (30 + 30) * sum(RESNET18_DIMS.values()) * 4  # training + test images x pooled dims x float32
    args = [f"--train_shards={synthetic_shards}", f"--test_shards={synthetic_shards}", "--arch=resnet18",
            "--image_size=32", "--num_workers=0"]
    monkeypatch.setattr(linear_probe, "available_memory", lambda: (need - 1, "a test's figure"))
    with pytest.raises(linear_probe.FeaturesTooLarge, match=(
            rf"30 training \+ 30 test images x 27136 dimensions \(res2, res3, res4, res5\) take {need:,} bytes .* "
            rf"more than the {need - 1:,} bytes .* available \(a test's figure\): use --mode=online")):
        linear_probe.main(args)
    monkeypatch.setattr(linear_probe, "available_memory", lambda: (need, "a test's figure"))
    with pytest.raises(Extracted):  # exactly enough: extracted
        linear_probe.main(args)


def test_available_memory_is_a_positive_byte_count_with_its_source():
    available = linear_probe.available_memory()
    if available is None:
        pytest.skip("neither psutil nor /proc/meminfo here")
    assert available[0] > 0 and isinstance(available[0], int) and available[1]


def test_the_trunk_forward_in_channels_last_and_bf16_gives_float32_features_near_the_float32_ones():
    torch.manual_seed(0)
    trunk, _, _ = linear_probe.load_trunk(linear_probe.ProbeConfig(arch="resnet18"))
    image, layers = torch.randn(4, 3, 32, 32), list(RESNET18_DIMS)
    plain = online_probe.frozen_features(trunk, image, layers)
    nhwc = online_probe.frozen_features(trunk.to(memory_format=torch.channels_last), image, layers,
                                        channels_last=True)
    bf16 = online_probe.frozen_features(trunk, image, layers, bf16=True, channels_last=True)
    for name in layers:
        assert nhwc[name].dtype == bf16[name].dtype == torch.float32
        torch.testing.assert_close(nhwc[name], plain[name], atol=1e-4, rtol=1e-4)
        error = ((bf16[name] - plain[name]).norm() / plain[name].norm()).item()
        assert 1e-4 < error < 3e-2, (name, error)  # bfloat16's 8 bits of mantissa, and only those


def test_a_run_with_the_pretraining_forward_keeps_the_trunk_in_channels_last_and_says_so(synthetic_shards, tmp_path,
                                                                                         monkeypatch):
    loaded = {}

    def load_and_keep(cfg):
        trunk, arch, recipe = linear_probe.load_trunk(cfg)
        loaded["trunk"] = trunk
        return trunk, arch, recipe

    calls = []
    features = online_probe.frozen_features

    def record_options(trunk, image, layers, **options):
        calls.append(options)
        return features(trunk, image, layers, **options)

    monkeypatch.setattr(online_probe, "load_trunk", load_and_keep)
    monkeypatch.setattr(online_probe, "frozen_features", record_options)
    fast = ("--online_bf16=true", "--online_channels_last=true", "--online_max_steps=2")
    result = linear_probe.main(online_args(synthetic_shards, tmp_path / "fast", *fast))
    assert loaded["trunk"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # 2 training steps, then the 30 test images in 4 batches: every trunk pass as pretraining runs it
    assert calls == [{"bf16": True, "channels_last": True}] * (2 + 4)
    assert (result["settings"]["bf16"], result["settings"]["channels_last"]) == (True, True)
    plain = linear_probe.main(online_args(synthetic_shards, tmp_path / "plain", "--online_max_steps=2"))
    assert (plain["settings"]["bf16"], plain["settings"]["channels_last"]) == (False, False)
    assert result["num_test"] == plain["num_test"] == 30
    # the same two steps on near-equal features: the heads' top-1 of 30 images agrees to within a few images
    assert all(abs(result["per_layer"][k] - plain["per_layer"][k]) <= 100 * 3 / 30 for k in RESNET18_DIMS)


def test_sigterm_checkpoints_the_step_it_ends_and_resume_finishes_as_the_uninterrupted_run(synthetic_shards, tmp_path,
                                                                                           capsys):
    class TermAfterStep3:
        steps = 0

        def step(self):  # after every training step, as tools/profile.py's clock
            self.steps += 1
            if self.steps == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    def config(out_dir):
        return linear_probe.ProbeConfig(
            mode="online", train_shards=str(synthetic_shards), test_shards=str(synthetic_shards), arch="resnet18",
            image_size=32, num_workers=0, batch_size=8, online_epochs=2, online_log_every=1, online_ckpt_every=100,
            online_tensorboard=False, online_cpu=True, online_out_dir=str(out_dir))

    expected = online_probe.online_probe(config(tmp_path / "full"))
    previous = signal.getsignal(signal.SIGTERM)
    assert online_probe.online_probe(config(tmp_path / "stopped"), profiler=TermAfterStep3()) == {}
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler put back
    assert "stopped on SIGTERM after step 3" in capsys.readouterr().out
    saved = sorted(p.name for p in (tmp_path / "stopped" / checkpoint.CHECKPOINT_DIR).iterdir())
    assert saved == [checkpoint.checkpoint_path(tmp_path, 3).name]  # the step it ended, not before
    assert not (tmp_path / "stopped" / "probe.json").exists()
    resumed = online_probe.online_probe(config(tmp_path / "stopped"), resume="latest")
    assert resumed["per_layer"] == pytest.approx(expected["per_layer"], rel=1e-5)
    assert resumed["per_layer_train"] == pytest.approx(expected["per_layer_train"], rel=1e-5)
