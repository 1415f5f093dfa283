"""tools/profile.py probe: online linear evaluation's img/s next to pretraining's, both timed on their real loops
over the same steps of the synthetic shards; its clock, its image count and the probe it builds from the config."""
import json
from pathlib import Path

import pytest
import torch

from pirl_trainer.pipelines.sampler import epoch_batches
from pirl_trainer.tools.profile import main
from pirl_trainer.tools.profiling import UsageError, machine, probe
from pirl_trainer.tools.profiling.probe import WallClock, images_in_steps, probe_config, probe_differences
from pirl_trainer.train.config import PirlConfig, load_config
from pirl_trainer.train.linear_probe import STAGES
from pirl_trainer.train.online_probe import check_online_config
from tests.train.conftest import synthetic_shards, tiny_overrides  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]
IMAGENETTE = str(REPO / "train/configs/imagenette_cpu.yaml")
SIDES = ("pretrain", "online")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def test_probe_times_both_loops_over_the_same_steps_and_reports_the_ratio(synthetic_shards, tmp_path, monkeypatch,
                                                                          capsys):
    clocks = []

    class KeptClock(WallClock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clocks.append(self)

    monkeypatch.setattr(probe, "WallClock", KeptClock)
    out = tmp_path / "probe.json"
    # synthetic_shards at batch 8: 4 steps an epoch, the last of 6 images; steps 1..4 cross the epoch's end
    argv = ["probe", "--config", IMAGENETTE, *tiny_overrides(synthetic_shards, tmp_path / "run"),
            "--test-shards", str(synthetic_shards), "--steps", "4", "--warmup", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert {"config", "overrides", "test_shards", "arch", "image_size", "batch_size", "num_workers", "backend",
            "layers", "warmup", "steps", "pretrain", "online", "online_over_pretrain", "not_in_probe", "device",
            "command"} <= result.keys()
    assert (result["arch"], result["image_size"], result["batch_size"], result["num_workers"]) == ("resnet18", 32, 8, 0)
    assert result["layers"] == list(STAGES) and (result["warmup"], result["steps"]) == (1, 4)
    assert result["device"].startswith("cpu: ") and result["not_in_probe"] == []
    assert result["command"].startswith("python tools/profile.py probe --config")
    for side in SIDES:
        r = result[side]
        assert r["images"] == 8 + 8 + 6 + 8  # the same images on both sides
        assert r["seconds"] > 0 and r["img_per_s"] == pytest.approx(r["images"] / r["seconds"])
        assert r["step_ms"] == pytest.approx(1000 * r["seconds"] / 4)
    assert result["online_over_pretrain"] == pytest.approx(result["online"]["img_per_s"] /
                                                           result["pretrain"]["img_per_s"])
    assert result["online_over_pretrain"] == pytest.approx(result["pretrain"]["seconds"] / result["online"]["seconds"])
    # each real loop ticked its clock once a step and stopped after warm-up + timed steps
    assert [c.ended for c in clocks] == [5, 5]
    assert [c.seconds for c in clocks] == [result[side]["seconds"] for side in SIDES]
    text = capsys.readouterr().out
    assert "img/s" in text and f"{result['online_over_pretrain']:.2f}x the pretraining step's" in text


def test_wall_clock_times_the_steps_after_the_warm_up_and_synchronises_at_their_two_ends_only(monkeypatch):
    now = [100.0]
    synced = []
    monkeypatch.setattr(probe.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(machine.torch.cuda, "synchronize", lambda device: synced.append(clock.ended))
    clock = None
    clock = WallClock(torch.device("cuda"), warmup=2, steps=3)
    for duration in (5.0, 7.0, 1.0, 2.0, 4.0, 9.0):  # warm-up 5 + 7, timed 1 + 2 + 4, then one more step
        now[0] += duration
        clock.step()
    assert clock.seconds == 7.0 and synced == [2, 5]

    cpu = WallClock(torch.device("cpu"), warmup=0, steps=2)  # no warm-up: the window opens at construction
    now[0] += 3.0
    cpu.step()
    with pytest.raises(UsageError, match="ended after 1 of its 2 steps"):
        cpu.seconds
    now[0] += 3.0
    cpu.step()
    assert cpu.seconds == 6.0 and synced == [2, 5]  # nothing to synchronise on the CPU


@pytest.mark.parametrize("num_samples, batch_size, first, last", [(30, 8, 1, 5), (30, 8, 0, 12), (4000, 64, 2, 12),
                                                                  (4000, 64, 60, 130), (9, 4, 3, 7), (5, 8, 0, 3)])
def test_images_in_steps_counts_the_sampler_s_batches(num_samples, batch_size, first, last):
    per_epoch = len(epoch_batches(num_samples, batch_size))
    sizes = [len(b) for b in epoch_batches(num_samples, batch_size)]
    assert images_in_steps(num_samples, batch_size, first, last) == sum(sizes[s % per_epoch]
                                                                        for s in range(first, last))


def test_images_in_steps_known_values():
    assert images_in_steps(30, 8, 1, 5) == 30  # 8 + 8 + 6 (an epoch's last batch) + 8
    assert images_in_steps(9, 4, 2, 4) == 1 + 4  # three steps an epoch: 4, 4, then the rest 1
    assert images_in_steps(4000, 64, 2, 12) == 640


def test_the_probe_takes_the_training_config_s_trunk_data_and_loader():
    cfg = load_config(PirlConfig, IMAGENETTE, ["--data.shards=shards/train", "--run.log_every=7"])
    probe_cfg = probe_config(cfg, "shards/test", "out", max_steps=12)
    assert (probe_cfg.mode, probe_cfg.arch, probe_cfg.image_size, probe_cfg.batch_size, probe_cfg.num_workers,
            probe_cfg.backend, probe_cfg.decode_device) == ("online", "resnet18", 64, 64, 2, "reference", "workers")
    assert (probe_cfg.train_shards, probe_cfg.test_shards, probe_cfg.online_out_dir) == ("shards/train", "shards/test",
                                                                                        "out")
    assert probe_cfg.online_max_steps == 12 and probe_cfg.online_log_every == 7 and not probe_cfg.online_tensorboard
    assert probe_cfg.online_eval_every == probe_cfg.online_epochs  # no scoring before the schedule's end
    assert check_online_config(probe_cfg) == list(STAGES)
    assert probe_differences(cfg) == []  # imagenette_cpu.yaml changes only the image view's size


def test_the_settings_the_probe_cannot_take_are_listed():
    cfg = load_config(PirlConfig, IMAGENETTE, ["--data.shards=s", "--data.decode_device=cpu", "--run.bf16=true",
                                               "--data.recipe.image_scale_min=0.5"])
    assert probe_differences(cfg) == ["data.recipe.image_scale_min=0.5 (online probe: 0.08)"]
    probe_cfg = probe_config(cfg, "t", "out", max_steps=1)  # the probe takes these
    assert (probe_cfg.decode_device, probe_cfg.online_bf16, probe_cfg.online_channels_last) == ("cpu", True, False)


@pytest.mark.parametrize("extra, named", [
    (["--test-shards", "no/such/folder"], "no/such/folder"),
    (["--test-shards", "{shards}", "--data.subset_fraction=0.1"], "data.subset"),
    (["--test-shards", "{shards}", "--steps", "0"], "--steps"),
    (["--test-shards", "{shards}", "--warmup", "-1"], "--warmup"),
    (["--test-shards", "{shards}", "--data.made_up=1"], "made_up"),
])
def test_bad_options_exit_2_naming_the_value_before_any_run(synthetic_shards, tmp_path, capsys, extra, named):
    extra = [e.format(shards=synthetic_shards) for e in extra]
    argv = ["probe", "--config", IMAGENETTE, f"--data.shards={synthetic_shards}", f"--run.out_dir={tmp_path / 'run'}",
            *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("profile.py probe: error:") and named in err
    assert not (tmp_path / "run").exists()  # the pretraining run never started


def test_help_names_the_probe_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--test-shards" in text and "--warmup" in text and "training-config override" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "profile.py probe --config" in capsys.readouterr().out  # the usage line in the module docstring
