import dataclasses
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[2]
R50 = str(REPO / "train" / "configs" / "imagenet_r50.yaml")


def _help(main) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_print_config_shows_a_missing_required_value_and_exits_0(capsys):
    from omegaconf import OmegaConf

    from pirl_trainer.train import pirl

    assert pirl.main(["--config", R50, "--print-config"]) is None  # returns: status 0, nothing trained
    captured = capsys.readouterr()
    printed = OmegaConf.create(captured.out)
    assert OmegaConf.is_missing(printed.data, "shards")  # shown as ???
    assert (printed.optim.epochs, printed.model.arch, printed.loss.num_negatives) == (800, "resnet50", 32000)
    assert "data.shards" in captured.err
    with pytest.raises(SystemExit) as exit_info:  # a run still needs it, and says which key
        pirl.main(["--config", R50])
    assert exit_info.value.code == 2
    assert "missing required config values: data.shards" in capsys.readouterr().err


def test_print_config_from_the_command_line_exits_0():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "train/pirl.py", "--config", "train/configs/imagenet_r50.yaml",
                           "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "  shards: ???\n" in done.stdout and "lr: 0.12" in done.stdout


def test_linear_probe_help_lists_every_key_with_its_default_and_meaning(capsys):
    from pirl_trainer.train import linear_probe

    _help(linear_probe.main)
    text = capsys.readouterr().out
    text = text[text.index("config keys:"):]  # after argparse's own options
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert {key.split("=")[0][2:] for key in lines} == {f.name for f in dataclasses.fields(linear_probe.ProbeConfig)}
    assert "Adam on standardised features" in lines["--lr=0.001"]
    for shown in ("--epochs=100", "--precise_bn=true", "--layers=[res2,res3,res4,res5]", "--train_shards=''",
                  "--weight_decays=[0.0001,0.0005,0.002,0.01,0.05,0.2]"):
        assert shown in lines, shown
    assert "optim." not in text and "data." not in text  # ProbeConfig has no sections


def test_pirl_help_lists_every_leaf_key_with_its_default(capsys):
    from omegaconf import OmegaConf

    from pirl_trainer.train import pirl

    _help(pirl.main)
    text = capsys.readouterr().out
    text = text[text.index("config keys:"):]  # after argparse's own options
    leaves = _leaves(OmegaConf.to_container(OmegaConf.structured(PirlConfig)))
    shown = {line.split()[0][2:].split("=", 1)[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert set(shown) == set(leaves)
    assert shown["data.shards"].split()[0] == "--data.shards=???"
    assert shown["optim.lr"].split()[0] == "--optim.lr=0.12" and shown["run.tensorboard"].split()[0].endswith("=true")
    assert "hash every shard" in shown["data.verify_sha256"]  # the comment above the field


@dataclasses.dataclass
class _Commented:
    a: int = 1  # on the line
    b: int = 2  # on the line,
    # and continued below it
    c: int = 3  # on the line
    # above the next field, which has none on its line
    d: int = 4
    # one comment over a pair
    e: int = 5
    f: int = 6

    g: int = 7


def test_help_takes_each_keys_meaning_from_its_own_comment():
    from pirl_trainer.train.config import config_keys

    meanings = {key.name: key.help for key in config_keys(_Commented)}
    assert meanings == {
        "a": "on the line", "b": "on the line, and continued below it", "c": "on the line",
        "d": "above the next field, which has none on its line", "e": "one comment over a pair",
        "f": "one comment over a pair", "g": "",
    }


@pytest.mark.parametrize(
    "script, argv, suggestion",
    [
        ("linear_probe", ["--optim.lr=0.3"], "--lr"),  # the key exists without a section
        ("pirl", ["--data.shards=/s", "--optim.lrr=1"], "--optim.lr"),  # a misspelling
        ("pirl", ["--data.shards=/s", "--lr=1"], "--optim.lr"),  # the section left out
    ],
)
def test_an_unknown_key_is_named_and_only_existing_keys_are_suggested(capsys, script, argv, suggestion):
    import importlib
    import re

    from pirl_trainer.train.config import config_keys

    module = importlib.import_module(f"pirl_trainer.train.{script}")
    schema = module.ProbeConfig if script == "linear_probe" else PirlConfig
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"unknown config key {argv[-1].split('=')[0]}" in err
    suggested = re.findall(r"--([\w.]+)", err.split("did you mean", 1)[1].split("?")[0])
    assert f"--{suggested[0]}" == suggestion
    assert set(suggested) <= {key.name for key in config_keys(schema)}


def test_a_yaml_typo_names_the_file_and_the_full_key(tmp_path):
    path = write(tmp_path, "data:\n  shards: /s\n  recipe:\n    patch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"data\.recipe\.patch_sise.*c\.yaml"):
        load_config(PirlConfig, path, [])


def test_a_file_that_is_not_yaml_is_named(tmp_path):
    path = write(tmp_path, "data: [shards: /s\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not valid YAML"):
        load_config(PirlConfig, path, [])
