"""checkpoint.trunk_weights: the one reader of a checkpoint's trunk, for the probes, fine-tuning and the export."""
import pytest
import torch

from pirl_trainer.model.covariant import CovariantNet
from pirl_trainer.model.moco import MoCoNet
from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.model.simclr import SimCLRNet
from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.train import checkpoint, linear_probe
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config, to_dict


def pirl_config(arch: str, *extra: str) -> dict:
    return to_dict(load_config(PirlConfig, None, [f"--model.arch={arch}", "--data.shards=unused", *extra]))


@pytest.mark.parametrize("net", [
    PIRLNet("resnet18", embed_dim=16), SimCLRNet("resnet18", embed_dim=16), MoCoNet("resnet18", embed_dim=16),
    CovariantNet("rotation", "resnet18"), CovariantNet("supervised", "resnet18", num_classes=10),
], ids=["pirl", "simclr", "moco", "rotation", "supervised"])
def test_every_methods_trunk_comes_out_as_torchvisions_keys_with_its_tensors(net):
    arch, weights = checkpoint.trunk_weights({"model": net.state_dict(), "config": pirl_config("resnet18")}, "a.pt")
    assert arch == "resnet18"
    assert weights.keys() == build_trunk("resnet18")[0].state_dict().keys()
    for key, value in net.trunk.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_a_checkpoint_without_a_config_names_no_arch():
    net = PIRLNet("resnet18", embed_dim=16)
    arch, weights = checkpoint.trunk_weights({"model": net.state_dict()}, "a.pt")
    assert arch is None and weights.keys() == net.trunk.state_dict().keys()


@pytest.mark.parametrize("state, message", [
    ([1, 2], "not a train/pirl.py checkpoint"),
    ({"step": 3}, "not a train/pirl.py checkpoint"),
    ({"model": {"head_f.proj.weight": torch.zeros(2, 2)}}, r"holds no trunk weights \(no 'trunk\.\*' keys"),
])
def test_a_state_without_a_trunk_is_a_value_error_naming_the_file(state, message):
    with pytest.raises(ValueError, match=rf"odd\.pt.*{message}"):
        checkpoint.trunk_weights(state, "odd.pt")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    net = PIRLNet("resnet18", embed_dim=16)
    path = tmp_path / "step.pt"
    checkpoint.save_atomic({"model": net.state_dict(), "config": pirl_config("resnet18",
                                                                              "--data.recipe.image_size=48")}, path)
    return net, path


def test_the_probe_loads_the_checkpoints_trunk_exactly_with_its_recipe(saved):
    net, path = saved
    trunk, arch, recipe = linear_probe.load_trunk(linear_probe.ProbeConfig(checkpoint=str(path)))
    assert (arch, recipe.image_size, trunk.training) == ("resnet18", 48, False)
    for key, value in net.trunk.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


def test_the_probe_names_a_checkpoint_that_does_not_fit(saved, tmp_path):
    net, path = saved
    with pytest.raises(ConfigError, match=rf"checkpoint: {path}'s trunk does not fit arch=resnet50"):
        linear_probe.load_trunk(linear_probe.ProbeConfig(checkpoint=str(path), arch="resnet50"))
    anonymous = tmp_path / "no_config.pt"
    checkpoint.save_atomic({"model": net.state_dict()}, anonymous)
    with pytest.raises(ConfigError, match=rf"checkpoint: {anonymous} names no model.arch in its config: set --arch"):
        linear_probe.load_trunk(linear_probe.ProbeConfig(checkpoint=str(anonymous)))
    trunk, arch, _ = linear_probe.load_trunk(linear_probe.ProbeConfig(checkpoint=str(anonymous), arch="resnet18"))
    assert arch == "resnet18" and torch.equal(trunk.conv1.weight, net.trunk.conv1.weight)
    headless = tmp_path / "heads.pt"
    checkpoint.save_atomic({"model": net.image_head.state_dict()}, headless)
    with pytest.raises(ConfigError, match=rf"checkpoint: {headless} holds no trunk weights"):
        linear_probe.load_trunk(linear_probe.ProbeConfig(checkpoint=str(headless)))
