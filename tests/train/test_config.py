import pytest

from pirl_trainer.train.config import ConfigError, PirlConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_yaml_then_cli_precedence(tmp_path):
    path = write(tmp_path, "data:\n  shards: /s\n  batch_size: 8\noptim:\n  lr: 0.2\n")
    cfg = load_config(PirlConfig, path, ["--optim.lr=0.3", "--model.arch", "resnet18"])
    assert cfg.data.shards == "/s"
    assert cfg.data.batch_size == 8  # YAML over default
    assert cfg.optim.lr == 0.3  # command line over YAML
    assert cfg.model.arch == "resnet18"
    assert cfg.optim.momentum == 0.9 and cfg.loss.tau == 0.07  # untouched defaults
    assert cfg.data.recipe.patch_size == 64


@pytest.mark.parametrize(
    "yaml_text, overrides, needle",
    [
        ("data:\n  shards: /s\n  batch_szie: 8\n", [], "batch_szie"),  # typo in YAML
        ("data:\n  shards: /s\n", ["--optim.learning_rate=0.1"], "learning_rate"),  # typo on the CLI
        ("data:\n  shards: /s\n", ["--data.recipe.patch_sise=32"], "patch_sise"),  # nested typo
        ("data:\n  shards: /s\n", ["--data.batch_size=many"], "many"),  # wrong type
        ("data:\n  shards: /s\n", ["--optim.lr"], "no value"),  # missing value
        ("data:\n  shards: /s\n", ["optim.lr=1"], "--section.key=value"),  # not an override
        ("model:\n  arch: resnet18\n", [], "data.shards"),  # required value missing
    ],
)
def test_bad_config_is_an_error_naming_the_key(tmp_path, yaml_text, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(PirlConfig, write(tmp_path, yaml_text), overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(PirlConfig, str(tmp_path / "nope.yaml"), [])


@pytest.mark.parametrize("name", ["imagenet_r50.yaml", "cpu_small.yaml", "imagenette_cpu.yaml", "imagenette_gpu.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "train" / "configs" / name
    cfg = load_config(PirlConfig, str(path), ["--data.shards=/s"])
    cfg.data.recipe.validate()
    if name == "imagenet_r50.yaml":  # the paper's recipe: 32 x 32 GPUs, 800 epochs, ResNet-50, 32k negatives
        assert (cfg.data.batch_size, cfg.optim.epochs, cfg.model.arch) == (32, 800, "resnet50")
        assert (cfg.optim.lr, cfg.optim.final_lr, cfg.loss.num_negatives) == (0.12, 0.00012, 32000)
    if name.startswith("imagenette"):  # Imagenette's train split has 4,000 images: the bank's rows
        assert cfg.loss.num_negatives < 4000 and cfg.loss.bank_init == "features"


def test_print_config_prints_and_runs_nothing(capsys):
    from pirl_trainer.train import linear_probe, pirl

    assert pirl.main(["--print-config", "--data.shards=/s", "--optim.lr=0.5"]) is None
    assert "lr: 0.5" in capsys.readouterr().out
    assert linear_probe.main(["--print-config", "--epochs=7"]) is None  # would fail on the missing shards if run
    assert "epochs: 7" in capsys.readouterr().out


def test_bad_override_exits_with_status_2(capsys):
    from pirl_trainer.train import pirl

    with pytest.raises(SystemExit) as exit_info:
        pirl.main(["--data.shards=/s", "--optim.lrr=1"])
    assert exit_info.value.code == 2 and "lrr" in capsys.readouterr().err


def test_the_multi_node_accelerate_config_loads_and_is_4_by_8():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parents[2] / "train" / "configs" / "accelerate" / "4nodes_8gpus.yaml"
    cfg = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys would raise
    assert (cfg.num_machines, cfg.num_processes) == (4, 32)
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.mixed_precision == "no"


def test_unknown_head_norm_is_a_config_error(tmp_path):
    from pirl_trainer.train.methods import check_method
    cfg = load_config(PirlConfig, None, ["--data.shards=x", "--model.head_norm=layer"])
    with pytest.raises(ConfigError, match="model.head_norm must be one of"):
        check_method(cfg)
