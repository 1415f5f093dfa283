"""tools/paper_table.py end to end at toy scale: every method's run, both protocols' per-layer probes, the table."""
import json
import math

import pytest
from omegaconf import OmegaConf

from pirl_trainer.tools import experiment, paper_table
from pirl_trainer.tools.synthetic_data import write_synthetic
from pirl_trainer.train import checkpoint, linear_probe

TINY = ["data.batch_size=8", "data.recipe.image_size=32", "data.recipe.jigsaw_size=48", "data.recipe.patch_size=16",
        "model.arch=resnet18", "loss.num_negatives=8", "run.log_every=1", "run.tensorboard=false", "run.cpu=true",
        "run.max_steps=2", "model.num_permutations=10"]


def test_the_table_compares_every_method_with_the_best_random_probe(tmp_path, capsys):
    for split, seed in (("train", 0), ("test", 1)):
        write_synthetic(tmp_path / "data" / split, per_class=2, size=48, seed=seed)
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--methods", "pirl,jigsaw,supervised",
            "--epochs", "1", "--workers", "0", "--set", *TINY]
    summary = paper_table.main(args)
    rows = summary["methods"]
    assert set(rows) == {"random_init", "pirl", "jigsaw", "supervised"}
    random_best = max(rows["random_init"]["best"][p]["top1"] for p in ("precise", "running"))
    assert summary["random_init_best"] == random_best
    for name in ("pirl", "jigsaw", "supervised"):
        row = rows[name]
        assert set(row["per_layer"]["precise"]) == {"res2", "res3", "res4", "res5"}
        worse = min(row["best"][p]["top1"] for p in ("precise", "running"))
        assert row["worse_protocol_top1"] == worse and row["margin_over_random"] == worse - random_best
        assert json.loads((out / name / "probe_running.json").read_text())["bn"] == "running"
        ceiling = rows["supervised"]["margin_over_random"]
        assert row["share_of_supervised_gain"] == (row["margin_over_random"] / ceiling if ceiling > 0 else None)
    assert (out / "table.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| jigsaw |" in table and "vs best random" in table and "share of supervised's gain" in table
    assert "== pretraining jigsaw" in capsys.readouterr().out
    # a re-run reuses the finished runs and probes instead of training again
    assert paper_table.main(args) == summary
    assert "== pretraining" not in capsys.readouterr().out
    # ...except a probe made with other probe settings (an older protocol), which is redone
    stale = out / "pirl" / "probe_running.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "top1": -1.0, "settings": {"weight_decays": [5e-4]}}))
    rerun = paper_table.main(args)
    redone = json.loads(stale.read_text())
    # the same trunk, data and settings: the redone probe gives back the number the stale one replaced
    assert redone["top1"] == summary["methods"]["pirl"]["best"]["running"]["top1"]
    assert redone["settings"] == linear_probe.probe_settings(linear_probe.ProbeConfig())
    assert rerun["methods"]["pirl"]["best"]["running"]["top1"] == redone["top1"]
    assert "== pretraining" not in capsys.readouterr().out


def test_every_method_of_the_table_has_its_config_and_simclr_and_moco_are_among_them():
    assert {"simclr", "moco"} <= set(paper_table.METHODS)
    for method in paper_table.METHODS:
        assert experiment.method_config(method).is_file(), method
    with pytest.raises(ValueError, match="no method config 'byol'.*shipped: jigsaw, moco, npid, pirl"):
        experiment.method_config("byol")


@pytest.mark.slow
def test_the_table_has_simclr_and_moco_rows_with_mocos_queue_as_long_as_the_banks_negatives(tmp_path, capsys):
    for split, seed in (("train", 0), ("test", 1)):
        write_synthetic(tmp_path / "data" / split, per_class=2, size=48, seed=seed)
    out = tmp_path / "out"
    # MoCo's shuffled BatchNorm needs >= 2 keys in each group at the epoch's last batch of 4 (20 images, batch 8)
    summary = paper_table.main(["--data", str(tmp_path / "data"), "--out", str(out), "--methods", "simclr,moco",
                                "--epochs", "1", "--workers", "0", "--set", *TINY, "loss.moco_bn_groups=2"])
    rows = summary["methods"]
    assert set(rows) == {"random_init", "simclr", "moco"}
    assert rows["simclr"]["paper_imagenet_top1"] == 69.3 and rows["moco"]["paper_imagenet_top1"] == 71.1
    for name in ("simclr", "moco"):
        assert set(rows[name]["per_layer"]["running"]) == {"res2", "res3", "res4", "res5"}
        assert rows[name]["margin_over_random"] == rows[name]["worse_protocol_top1"] - summary["random_init_best"]
    table = (out / "table.md").read_text()
    assert "| simclr |" in table and "| moco |" in table
    # the queue holds loss.num_negatives=8 keys (TINY), not MoCo's 65,536; simclr's run has no queue to set
    state = checkpoint.load(json.loads((out / "moco" / "pretrain.json").read_text())["checkpoint"])
    assert state["moco"]["queue"].shape[0] == 8
    assert "moco_queue_size: 8" in (out / "moco" / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert "== pretraining simclr" in printed and "== pretraining moco" in printed
    assert "--loss.moco_queue_size" not in printed.split("== pretraining moco")[0]
    # SimCLR's small-batch rate (its appendix B.1): 0.075 x sqrt(8) at TINY's batch of 8, quoted at batch 256
    simclr = OmegaConf.load(out / "simclr" / "config.yaml")
    assert simclr.optim.lr * 8 / simclr.optim.reference_batch == pytest.approx(0.075 * math.sqrt(8), rel=1e-5)
