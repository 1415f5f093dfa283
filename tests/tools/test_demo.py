"""tools/demo.py, the README's first command, end to end at toy scale: data, shards, a PIRL step, the kNN monitor,
both trunks' probes under both protocols, summary.json, summary.png and the final line."""
import json

import pytest
import torch

from pirl_trainer.model.trunk import build_trunk
from tests.train.test_knn_monitor import brute_force_knn_top1
from pirl_trainer.tools import demo
from pirl_trainer.train import checkpoint
from pirl_trainer.train.config import PirlConfig, load_config


def test_the_main_job_compares_pirls_worse_protocol_with_random_inits_better_one(tmp_path, capsys):
    out = tmp_path / "demo"
    # 40 training images: two steps per epoch at the config's batch of 32; the kNN monitor after each step
    summary = demo.main(["--out", str(out), "--per-class", "4", "--epochs", "2", "--workers", "0", "--knn-every", "1"])

    assert json.loads((out / "summary.json").read_text()) == summary
    probes = summary["probes"]
    assert set(probes) == {"pirl", "random_init"}
    for by_bn in probes.values():
        assert set(by_bn) == {"precise", "running"}
        for probe in by_bn.values():
            assert set(probe["per_layer"]) == {"res2", "res3", "res4", "res5"}
            assert probe["top1"] == probe["per_layer"][probe["best_layer"]] == max(probe["per_layer"].values())
    assert summary["pirl_top1"] == min(p["top1"] for p in probes["pirl"].values())
    assert summary["random_init_top1"] == max(p["top1"] for p in probes["random_init"].values())
    assert summary["margin"] == pytest.approx(summary["pirl_top1"] - summary["random_init_top1"])
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    knn = [r for r in log if "knn_top1" in r]
    assert [r["step"] for r in knn] == [1, 2, 3, 4]
    # both kNN values recomputed by a brute-force vote: the random-init trunk (seed 0, as the probe's) and the
    # trunk of the last step's checkpoint
    cfg = load_config(PirlConfig, str(demo.CONFIG), [f"--data.shards={out / 'shards' / 'train'}"])
    shards = (out / "shards" / "train", out / "shards" / "test", cfg.data.recipe)
    vote = dict(k=cfg.knn.k, temperature=cfg.knn.temperature)
    torch.manual_seed(0)
    trunk, _ = build_trunk(cfg.model.arch)
    assert summary["knn_random_init_top1"] == pytest.approx(brute_force_knn_top1(trunk, *shards, **vote), abs=1e-4)
    state = checkpoint.load(summary["checkpoint"])
    assert state["step"] == 4
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in state["model"].items() if k.startswith("trunk.")})
    assert knn[-1]["knn_top1"] == pytest.approx(brute_force_knn_top1(trunk, *shards, **vote), abs=1e-4)
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"vs random init best {summary['random_init_top1']:.1f}%: {summary['margin']:+.1f} points" in printed
    assert f"plot: {out / 'summary.png'}" in printed


def test_the_main_job_never_clears_a_folder_it_did_not_make(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not made by tools/demo.py"):
        demo.main(["--out", str(foreign)])
    assert (foreign / "keep.txt").read_text() == "mine"
