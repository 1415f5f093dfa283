"""tools/export.py: a checkpoint's trunk loads strictly into torchvision, tensor for tensor, output for output."""
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import torchvision

from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.model.sync_batchnorm import convert_sync_batchnorm
from tests.train.conftest import synthetic_shards, tiny_overrides  # noqa: F401 (synthetic_shards: the fixture)
from pirl_trainer.tools import export
from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.config import PirlConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


def torchvision_trunk(arch: str, path: Path) -> torch.nn.Module:
    """What a user of the file does: a torchvision ResNet without its classifier, loaded strictly."""
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
    return model.eval()


def trunk_of(state: dict) -> dict[str, torch.Tensor]:
    return {k[len("trunk."):]: v for k, v in state["model"].items() if k.startswith("trunk.")}


def handmade_checkpoint(net: PIRLNet, arch: str, path: Path, step: int = 7) -> Path:
    """A checkpoint in train/pirl.py's format (its model and config entries; the rest is not read)."""
    state = {"model": net.state_dict(), "step": step,
             "config": to_dict(load_config(PirlConfig, None, [f"--model.arch={arch}", "--data.shards=unused"]))}
    checkpoint.save_atomic(state, path)
    return path


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):  # noqa: F811
    """A real 2-step train/pirl.py run (ResNet-18, 32 px), channels_last so that conv weights are saved NHWC."""
    out = tmp_path_factory.mktemp("run")
    pirl.main([*tiny_overrides(synthetic_shards, out), "--run.max_steps=2", "--run.channels_last=true"])
    return checkpoint.checkpoint_path(out, 2)


def test_export_of_a_trained_checkpoint_loads_strictly_into_torchvision(trained, tmp_path, capsys):
    output = tmp_path / "trunk.safetensors"
    assert export.main(["--checkpoint", str(trained), "--output", str(output)]) == 0
    state = checkpoint.load(trained)
    expected = trunk_of(state)
    assert f"{len(expected)} tensors" in capsys.readouterr().out

    # Training moved the weights and the BatchNorm statistics off their initial values: the comparison means something.
    assert not torch.equal(expected["bn1.running_var"], torch.ones_like(expected["bn1.running_var"]))
    # 2 steps x the image pass: the patch pass leaves the running statistics alone (PIRLNet.patch_bn_stats=False)
    assert int(expected["bn1.num_batches_tracked"]) == 2
    assert not expected["conv1.weight"].is_contiguous()  # channels_last: the exporter must make it contiguous

    model = torchvision_trunk("resnet18", output)
    exported = model.state_dict()
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key

    with safetensors.safe_open(output, "pt") as fh:
        meta = fh.metadata()
    assert meta["arch"] == "resnet18" and meta["step"] == "2"
    assert meta["source_checkpoint"] == str(trained.resolve())

    net = PIRLNet("resnet18", embed_dim=state["config"]["model"]["embed_dim"], num_patches=9)
    net.load_state_dict(state["model"])
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # float32 rounding only: the weights are equal above; our trunk runs res5's 1x1 maps as a matmul
        # (model/small_maps.py)
        torch.testing.assert_close(model(x), net.trunk(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_command_line_as_documented(trained, tmp_path):
    """`python tools/export.py` from the repository root (tools/ on sys.path would shadow `profile`)."""
    output = tmp_path / "out" / "trunk.safetensors"  # a missing folder is made
    command = [sys.executable, "tools/export.py", "--checkpoint", str(trained), "--output", str(output)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(output) in done.stdout and f"{len(trunk_of(checkpoint.load(trained)))} tensors" in done.stdout
    torchvision_trunk("resnet18", output)


def test_resnet50_export_loads_into_torchvision_resnet50(tmp_path):
    torch.manual_seed(0)
    net = PIRLNet("resnet50", embed_dim=16, num_patches=9)
    with torch.no_grad():
        for module in net.trunk.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # not the fresh-init 0 / 1, so a mix-up would show
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(3)
    path = handmade_checkpoint(net, "resnet50", tmp_path / "r50.pt", step=11)
    output = tmp_path / "r50.safetensors"
    assert export.export(path, output) == ("resnet50", len(net.trunk.state_dict()))
    exported = torchvision_trunk("resnet50", output).state_dict()
    for key, tensor in net.trunk.state_dict().items():
        assert torch.equal(exported[key], tensor), key
    with safetensors.safe_open(output, "pt") as fh:
        assert fh.metadata()["step"] == "11"


def test_sync_bn_checkpoint_has_plain_batchnorm_keys(tmp_path):
    """model.sync_bn swaps BatchNorm2d for GlooSyncBatchNorm2d (CPU) or nn.SyncBatchNorm (CUDA): same keys."""
    plain = PIRLNet("resnet18", embed_dim=16, num_patches=9)
    gloo = convert_sync_batchnorm(PIRLNet("resnet18", embed_dim=16, num_patches=9), torch.device("cpu"))
    cuda_kind = torch.nn.SyncBatchNorm.convert_sync_batchnorm(PIRLNet("resnet18", embed_dim=16, num_patches=9))
    assert type(gloo.trunk.bn1).__name__ == "GlooSyncBatchNorm2d"
    assert isinstance(cuda_kind.trunk.bn1, torch.nn.SyncBatchNorm)
    assert gloo.state_dict().keys() == plain.state_dict().keys() == cuda_kind.state_dict().keys()
    output = tmp_path / "trunk.safetensors"
    export.export(handmade_checkpoint(gloo, "resnet18", tmp_path / "sync.pt"), output)
    torchvision_trunk("resnet18", output)


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    output = tmp_path / "trunk.safetensors"
    assert export.main(["--checkpoint", str(missing), "--output", str(output)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not output.exists()


def test_checkpoint_without_trunk_keys_is_named(tmp_path, capsys):
    net = PIRLNet("resnet18", embed_dim=16, num_patches=9)
    path = tmp_path / "heads_only.pt"
    state = {"model": {k: v for k, v in net.state_dict().items() if not k.startswith("trunk.")}, "step": 1,
             "config": {"model": {"arch": "resnet18"}}}
    checkpoint.save_atomic(state, path)
    output = tmp_path / "trunk.safetensors"
    assert export.main(["--checkpoint", str(path), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "trunk." in err
    assert not output.exists()


def test_unknown_arch_and_mismatched_trunk_are_named(tmp_path):
    net = PIRLNet("resnet18", embed_dim=16, num_patches=9)
    unknown = handmade_checkpoint(net, "resnet18", tmp_path / "unknown.pt")
    state = checkpoint.load(unknown)
    state["config"]["model"]["arch"] = "vit_b_16"
    checkpoint.save_atomic(state, unknown)
    with pytest.raises(ValueError, match=r"unknown\.pt: unknown trunk arch 'vit_b_16'"):
        export.export(unknown, tmp_path / "a.safetensors")

    wrong = handmade_checkpoint(net, "resnet34", tmp_path / "wrong.pt")  # resnet18 weights, resnet34 config
    with pytest.raises(ValueError, match=r"wrong\.pt: trunk keys do not match torchvision resnet34"):
        export.export(wrong, tmp_path / "b.safetensors")
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    path = handmade_checkpoint(PIRLNet("resnet18", embed_dim=16, num_patches=9), "resnet18", tmp_path / "c.pt")
    output = tmp_path / "trunk.safetensors"
    output.write_bytes(b"an earlier export")

    def fail(fd):  # the data is written to the temporary file by now; the disk refuses to keep it
        raise failure

    monkeypatch.setattr(export.os, "fsync", fail)
    with pytest.raises(type(failure)) as caught:
        export.export(path, output)
    if isinstance(failure, OSError):
        assert str(output) in str(caught.value)
    assert output.read_bytes() == b"an earlier export"  # the old file is untouched, no new one half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "trunk.safetensors"]


def test_output_may_not_be_the_checkpoint(tmp_path):
    path = handmade_checkpoint(PIRLNet("resnet18", embed_dim=16, num_patches=9), "resnet18", tmp_path / "c.pt")
    with pytest.raises(ValueError, match="checkpoint itself"):
        export.export(path, path)
    checkpoint.load(path)
