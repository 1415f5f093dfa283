import json

import pytest
import torch
import torch.nn.functional as F

from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.train import linear_probe
from pirl_trainer.train.config import ConfigError

RESNET18_DIMS = {"res2": 64 * 12 * 12, "res3": 128 * 8 * 8, "res4": 256 * 6 * 6, "res5": 512}


def probe_args(shards, *extra):
    return [f"--train_shards={shards}", f"--test_shards={shards}", "--arch=resnet18", "--image_size=32",
            "--num_workers=0", "--epochs=5", *extra]


@pytest.mark.parametrize("channels, dims", [
    ((64, 128, 256, 512), (9216, 8192, 9216, 512)),  # resnet18/34
    ((256, 512, 1024, 2048), (9216, 8192, 9216, 2048)),  # resnet50: Goyal et al.'s 6x6, 4x4, 3x3 and the global pool
])
def test_pool_grid_gives_about_9000_dims_per_stage(channels, dims):
    got = tuple(c * linear_probe.pool_grid(stage, c) ** 2 for stage, c in zip(linear_probe.STAGES, channels))
    assert got == dims


@pytest.mark.parametrize("size", [32, 48])
def test_stage_features_dims_do_not_depend_on_the_image_size_and_res5_is_the_trunk_output(size):
    torch.manual_seed(0)
    trunk, _ = build_trunk("resnet18")
    trunk.eval()
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = linear_probe.stage_features(trunk, image, list(linear_probe.STAGES))
        v = trunk(image)
    assert {name: f.shape for name, f in feats.items()} == {name: (2, d) for name, d in RESNET18_DIMS.items()}
    torch.testing.assert_close(feats["res5"], v)


def test_stage_features_stops_after_the_last_stage_asked_for():
    trunk, _ = build_trunk("resnet18")
    trunk.layer3 = trunk.layer4 = None  # would raise if called
    with torch.no_grad():
        feats = linear_probe.stage_features(trunk.eval(), torch.randn(1, 3, 32, 32), ["res3", "res2"])
    assert list(feats) == ["res2", "res3"]


def test_probe_reports_every_layer_and_the_best_one(synthetic_shards, tmp_path):
    out = tmp_path / "probe.json"
    result = linear_probe.main(probe_args(synthetic_shards, f"--output={out}"))
    assert list(result["per_layer"]) == list(linear_probe.STAGES)
    assert result["feature_dims"] == RESNET18_DIMS
    assert result["best_layer"] == max(result["per_layer"], key=result["per_layer"].get)
    assert result["top1"] == result["per_layer"][result["best_layer"]]
    assert result["feature_dim"] == RESNET18_DIMS[result["best_layer"]]
    # the same shards on both sides: the test features are the training features, so are their scores
    assert result["per_layer"] == result["per_layer_train"]
    assert result["bn"] == "precise" and result["num_train"] == result["num_test"] == 30
    grid = linear_probe.ProbeConfig().weight_decays
    assert set(result["weight_decay"]) == set(result["per_layer_validation"]) == set(linear_probe.STAGES)
    assert all(decay in grid for decay in result["weight_decay"].values())
    # held out: 6 of the 30 images, so a multiple of 100 / 6
    assert all(round(top1 * 6 / 100, 4).is_integer() for top1 in result["per_layer_validation"].values())
    assert json.loads(out.read_text()) == result


def test_probe_scores_the_test_split_with_the_classifier_fitted_on_the_train_split(synthetic_shards, monkeypatch):
    """Features with known answers in place of the trunk's: res2 is the one-hot label (plus noise) on both
    splits, so 100 %; res3 is that on the training split but the one-hot of a wrong class on 24 of the 30 test
    images, so exactly 20 % on the test split while 100 % on the training split."""
    gen = torch.Generator().manual_seed(0)
    y_train, y_test = torch.arange(60) % 10, torch.arange(30) % 10
    shown = y_test.clone()
    shown[6:] = (y_test[6:] + 1 + torch.arange(24) % 9) % 10  # never the true class
    one_hot = lambda y: F.one_hot(y, 10).float() + 0.05 * torch.randn(len(y), 10, generator=gen)  # noqa: E731
    features = {"train": ({"res2": one_hot(y_train), "res3": one_hot(y_train)}, y_train),
                "test": ({"res2": one_hot(y_test), "res3": one_hot(shown)}, y_test)}

    def extract(trunk, shards, recipe, cfg, what, layers):
        feats, labels = features[what]
        return {name: feats[name] for name in layers}, labels, 10

    monkeypatch.setattr(linear_probe, "extract", extract)
    result = linear_probe.main([f"--train_shards={synthetic_shards}", f"--test_shards={synthetic_shards}",
                                "--arch=resnet18", "--layers=[res2,res3]", "--epochs=50", "--lr=0.05"])
    assert result["per_layer"] == pytest.approx({"res2": 100.0, "res3": 20.0})  # float32 percents
    assert result["per_layer_train"] == pytest.approx({"res2": 100.0, "res3": 100.0})
    assert result["per_layer_validation"] == pytest.approx({"res2": 100.0, "res3": 100.0})
    assert (result["best_layer"], result["top1"], result["train_top1"]) == ("res2", 100.0, 100.0)
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (60, 30, 10)


def test_probe_on_a_subset_with_running_batchnorm(synthetic_shards):
    result = linear_probe.main(probe_args(synthetic_shards, "--layers=[res5,res3]", "--precise_bn=false"))
    assert list(result["per_layer"]) == ["res3", "res5"]  # forward order, whatever the order asked
    assert result["bn"] == "running"


@pytest.mark.parametrize("layers", ["[res5,res6]", "[]"])
def test_an_unknown_or_empty_layer_list_is_a_config_error(synthetic_shards, layers):
    with pytest.raises(ConfigError, match="layers must be"):
        linear_probe.main(probe_args(synthetic_shards, f"--layers={layers}"))


def blobs(n=120, dims=16, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dims, generator=gen)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dims, generator=gen), y


def test_side_by_side_fits_equal_separate_fits_and_adams_weight_decay():
    x, y = blobs()
    cfg = linear_probe.ProbeConfig(epochs=3, seed=4)
    weights, biases = linear_probe.fit_linear(x, y, 3, [0.0, 0.3], cfg)
    assert weights.shape == (2, 16, 3) and biases.shape == (2, 3)
    for i, decay in enumerate([0.0, 0.3]):
        w, b = linear_probe.fit_linear(x, y, 3, [decay], cfg)
        torch.testing.assert_close((weights[i], biases[i]), (w[0], b[0]))
        # the reference: torch.nn.Linear + torch.optim.Adam(weight_decay=...), same start and order
        gen = torch.Generator().manual_seed(cfg.seed)
        clf = torch.nn.Linear(16, 3)
        with torch.no_grad():
            clf.weight.copy_(((torch.rand(16, 3, generator=gen) * 2 - 1) / 4).T)
            clf.bias.copy_((torch.rand(3, generator=gen) * 2 - 1) / 4)
        opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr, weight_decay=decay)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), 256):
                rows = order[start : start + 256]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(clf(x[rows]), y[rows]).backward()
                opt.step()
        torch.testing.assert_close((weights[i], biases[i]), (clf.weight.detach().T, clf.bias.detach()))
    assert not torch.allclose(weights[0], weights[1])  # the decay did act


def test_the_weight_decay_is_chosen_on_held_out_training_features():
    x, y = blobs(n=150)
    cfg = linear_probe.ProbeConfig(epochs=20, lr=0.05, weight_decays=[1e3, 0.0], validation_fraction=0.2)
    weight, bias, decay, held_out = linear_probe.fit_probe(x, y, 3, cfg)
    # 1e3 shrinks every weight to ~0 (chance); the separable blobs want none
    assert decay == 0.0 and held_out == 100.0
    assert weight.shape == (16, 3) and linear_probe.top1(weight, bias, x, y) == 100.0
    _, _, decay, held_out = linear_probe.fit_probe(x, y, 3, linear_probe.ProbeConfig(epochs=2, weight_decays=[0.5]))
    assert (decay, held_out) == (0.5, None)  # one value: nothing held out, nothing chosen


@pytest.mark.parametrize("extra, match", [
    ("--weight_decays=[]", "weight_decays must be"),
    ("--weight_decays=[0.1,-1.0]", "weight_decays must be"),
    ("--validation_fraction=1.0", "validation_fraction must be"),
])
def test_a_bad_weight_decay_grid_is_a_config_error(synthetic_shards, extra, match):
    with pytest.raises(ConfigError, match=match):
        linear_probe.main(probe_args(synthetic_shards, extra))


def test_shards_with_other_classes_are_refused_before_any_feature(synthetic_shards, tmp_path, monkeypatch):
    from pirl_trainer.pipelines.class_index import ClassIndexMismatch
    from tests.train.test_knn_monitor import SYNTHETIC_CLASSES, relabelled_copy

    test = relabelled_copy(synthetic_shards, tmp_path / "test", [*SYNTHETIC_CLASSES[:9], "triangle_open"])

    def extract(*args):
        raise AssertionError("features extracted before the classes were compared")

    monkeypatch.setattr(linear_probe, "extract", extract)
    with pytest.raises(ClassIndexMismatch, match=(
            f"linear probe: training shards {synthetic_shards} and test shards {test} have different class indexes: "
            "class 9 is 'triangle_outline' in the training shards and 'triangle_open' in the test shards")):
        linear_probe.main(probe_args(synthetic_shards, f"--test_shards={test}"))


def test_decode_device_cpu_gives_the_workers_paths_eval_images(synthetic_shards):
    """decode_device=cpu: the main process decodes and cuts; the eval views agree with the workers' (the same
    resize weights, float against torch's fixed-point uint8 kernel: rounding only), so do the labels."""
    from pirl_trainer.pipelines.recipe import PirlRecipe
    from pirl_trainer.pipelines.reference import MainProcessDecodeLoader

    recipe = PirlRecipe(image_size=32, jigsaw_size=48, patch_size=16)
    batches = {}
    for device in ("workers", "cpu"):
        cfg = linear_probe.ProbeConfig(backend="reference", decode_device=device, num_workers=0, batch_size=8)
        loader = linear_probe.eval_loader(str(synthetic_shards), recipe, cfg)
        assert isinstance(loader, MainProcessDecodeLoader) == (device == "cpu")
        loader.set_epoch(0)
        batches[device] = next(iter(loader))
    assert torch.equal(batches["workers"]["label"], batches["cpu"]["label"])
    diff = (batches["workers"]["image"].float() - batches["cpu"]["image"].float()).abs()
    assert diff.mean() < 0.5 and diff.max() <= 2


def test_decode_device_on_another_backend_is_a_config_error(synthetic_shards):
    from pirl_trainer.pipelines.recipe import PirlRecipe

    cfg = linear_probe.ProbeConfig(backend="ffcv", decode_device="cpu")
    with pytest.raises(ConfigError, match="decode_device=cpu applies to backend=reference only, not ffcv"):
        linear_probe.eval_loader(str(synthetic_shards), PirlRecipe(), cfg)
