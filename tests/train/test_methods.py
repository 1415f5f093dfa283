"""The baselines as config values: one loop, the same pipelines; each method's objective and targets."""
import json

import pytest
import torch

from pirl_trainer import pipelines
from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.augment import BatchAugment
from tests.train.conftest import tiny_overrides
from tests.train.test_knn_monitor import brute_force_knn_top1
from pirl_trainer.train import checkpoint, linear_probe, pirl
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config
from pirl_trainer.train.methods import covariant_target

METHOD_CONFIGS = "train/configs/methods"


def run(shards, out_dir, method, *extra):
    return pirl.main(["--config", f"{METHOD_CONFIGS}/{method}.yaml", *tiny_overrides(shards, out_dir),
                      "--run.max_steps=3", *extra])


@pytest.mark.parametrize("method, terms", [
    ("npid", {"loss", "loss_image", "pos_image", "neg_image"}),
    ("jigsaw", {"loss", "accuracy"}),
    ("rotation", {"loss", "accuracy"}),
    ("supervised", {"loss", "accuracy"}),
    ("pirl_rotation", {"loss", "loss_jigsaw", "loss_image", "pos_image", "neg_image"}),
])
def test_each_method_trains_logs_its_terms_and_its_trunk_is_probed(synthetic_shards, tmp_path, method, terms):
    record = run(synthetic_shards, tmp_path / "run", method)
    assert terms <= set(record) and all(torch.isfinite(torch.tensor(record[t])) for t in terms)
    assert not ({"loss_jigsaw", "accuracy", "loss_image"} - terms) & set(record)  # no other method's terms
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "run"))
    assert state["config"]["method"] == ("pirl" if method == "pirl_rotation" else method)
    assert (state["bank"] is None) == (method in ("jigsaw", "rotation", "supervised"))
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    result = linear_probe.main([f"--checkpoint={latest}", f"--train_shards={synthetic_shards}",
                                f"--test_shards={synthetic_shards}", "--num_workers=0", "--epochs=2",
                                "--layers=[res5]"])
    # the run's trunk at the run's crop size; the same shards on both sides score the same features the same
    assert (result["trunk"], result["arch"], result["image_size"]) == (str(latest), "resnet18", 32)
    assert result["top1"] == result["train_top1"] and result["num_train"] == result["num_test"] == 30


def test_jigsaw_classifies_the_permutation_drawn_per_sample(synthetic_shards, tmp_path):
    cfg = load_config(PirlConfig, f"{METHOD_CONFIGS}/jigsaw.yaml", tiny_overrides(synthetic_shards, tmp_path))
    index = torch.tensor([3, 7, 11, 2])
    ids = covariant_target(cfg, 5, 0, index)
    assert ids.min() >= 0 and ids.max() < cfg.model.num_permutations
    # a function of (seed, step, global index): the same in another batch, different at another step
    assert torch.equal(covariant_target(cfg, 5, 0, index[[2, 0]]), ids[[2, 0]])
    assert not torch.equal(covariant_target(cfg, 6, 0, index), ids)


def test_rotation_target_is_the_turn_the_batched_stage_applied(synthetic_shards, tmp_path):
    """With the colour jitter off, turning It back by its target gives the loader's unrotated view."""
    overrides = [*tiny_overrides(synthetic_shards, tmp_path), "--data.recipe.jitter_p=0", "--data.recipe.grayscale_p=0"]
    cfg = load_config(PirlConfig, f"{METHOD_CONFIGS}/rotation.yaml", overrides)
    r = cfg.data.recipe
    loader = pipelines.make_loader("reference", str(synthetic_shards), r, batch_size=16, num_workers=0)
    loader.set_epoch(2)
    raw = next(iter(loader))
    out = BatchAugment(r, seed=cfg.run.seed)(raw, epoch=2)
    target = covariant_target(cfg, 0, 2, raw[B.INDEX])
    assert set(target.tolist()) > {0}  # several turns in one batch
    mean, std = torch.tensor(r.mean).view(3, 1, 1), torch.tensor(r.std).view(3, 1, 1)
    plain = (raw[B.PATCHES][:, 0].float() / 255 - mean) / std
    for b, turns in enumerate(target.tolist()):
        back = torch.rot90(out[B.PATCHES][b, 0], -turns, dims=(-2, -1))
        assert torch.allclose(back, plain[b], atol=1e-5), (b, turns)


def test_supervised_targets_are_the_labels_and_its_classifier_has_one_output_per_class(synthetic_shards, tmp_path):
    cfg = load_config(PirlConfig, f"{METHOD_CONFIGS}/supervised.yaml", tiny_overrides(synthetic_shards, tmp_path))
    label = torch.tensor([4, 0, 9])
    assert torch.equal(covariant_target(cfg, 0, 0, torch.tensor([7, 1, 2]), label), label)
    run(synthetic_shards, tmp_path / "run", "supervised")
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "run"))
    assert state["model"]["classifier.classifier.weight"].shape == (10, 512)  # the manifest's 10 classes


def test_supervised_on_unlabelled_shards_is_a_config_error(unlabelled_shards, tmp_path):
    with pytest.raises(ConfigError, match="method=supervised learns the class labels.*not labelled"):
        run(unlabelled_shards, tmp_path / "run", "supervised")


@pytest.mark.parametrize("method, view", [("jigsaw", "rotation"), ("rotation", "jigsaw"), ("jigsaw", "rotation_jigsaw")])
def test_a_view_the_method_cannot_learn_from_is_a_config_error(synthetic_shards, tmp_path, method, view, capsys):
    with pytest.raises(ConfigError, match=f"method={method} learns from the"):
        run(synthetic_shards, tmp_path, method, f"--data.recipe.jigsaw_view={view}")
    with pytest.raises(ConfigError, match="method must be one of"):
        pirl.main([*tiny_overrides(synthetic_shards, tmp_path), "--method=byol"])


def test_resuming_with_another_method_is_refused(synthetic_shards, tmp_path):
    run(synthetic_shards, tmp_path / "run", "npid")
    with pytest.raises(ValueError, match="trained with method=npid, this run has method=jigsaw"):
        pirl.main(["--config", f"{METHOD_CONFIGS}/jigsaw.yaml", *tiny_overrides(synthetic_shards, tmp_path / "run"),
                   "--resume"])


def test_knn_monitor_logs_every_n_steps_and_shows_in_the_progress_line(synthetic_shards, tmp_path, capsys):
    run(synthetic_shards, tmp_path / "run", "pirl", "--knn.every=2", f"--knn.test_shards={synthetic_shards}",
        "--knn.max_train=20", "--run.max_steps=4")  # 10 test images are not among the voters
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4]
    assert all((r["knn_k"], r["knn_num_train"], r["knn_num_test"]) == (20, 20, 30) for r in knn)
    # the last value, recomputed from the final checkpoint's trunk by a brute-force vote
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 4
    trunk, _ = build_trunk("resnet18")
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in state["model"].items() if k.startswith("trunk.")})
    cfg = load_config(PirlConfig, f"{METHOD_CONFIGS}/pirl.yaml", tiny_overrides(synthetic_shards, tmp_path))
    recipe = cfg.data.recipe
    expected = brute_force_knn_top1(trunk, synthetic_shards, synthetic_shards, recipe, k=20, temperature=0.07,
                                    max_train=20)
    assert knn[-1]["knn_top1"] == pytest.approx(expected, abs=1e-4)  # float32 percent
    assert "knn=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="knn.test_shards"):
        run(synthetic_shards, tmp_path / "bad", "pirl", "--knn.every=2")


def test_config_files_layer_in_order(tmp_path):
    base, top = tmp_path / "base.yaml", tmp_path / "top.yaml"
    base.write_text("data:\n  batch_size: 64\n  num_workers: 3\n")
    top.write_text("method: jigsaw\ndata:\n  batch_size: 16\n")
    cfg = load_config(PirlConfig, [str(base), str(top)], ["--data.shards=/s", "--data.num_workers=1"])
    assert (cfg.method, cfg.data.batch_size, cfg.data.num_workers) == ("jigsaw", 16, 1)


def test_supervised_and_the_knn_monitor_refuse_test_shards_with_other_classes(synthetic_shards, tmp_path):
    from pirl_trainer.pipelines.class_index import ClassIndexMismatch
    from tests.train.test_knn_monitor import SYNTHETIC_CLASSES, relabelled_copy

    test = relabelled_copy(synthetic_shards, tmp_path / "test", SYNTHETIC_CLASSES[::-1])
    knn = ["--knn.every=2", f"--knn.test_shards={test}"]
    with pytest.raises(ClassIndexMismatch, match=(
            rf"method=supervised \(data.shards against knn.test_shards\): training shards {synthetic_shards} and "
            f"test shards {test} have different class indexes: class 0 is 'bar' in the training shards and "
            "'triangle_outline' in the test shards")):
        run(synthetic_shards, tmp_path / "supervised", "supervised", *knn)
    with pytest.raises(ClassIndexMismatch, match=f"kNN monitor: training shards {synthetic_shards} and test shards"):
        run(synthetic_shards, tmp_path / "pirl", "pirl", *knn)
    assert not list(tmp_path.glob("*/checkpoints/*.pt"))  # refused before the first step
