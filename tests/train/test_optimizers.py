"""optim.optimizer: "sgd" is exactly the plain torch.optim.SGD; "lars" (train/lars.py) matches a hand computation
of the trust ratio with momentum, leaves biases and BatchNorm weights to plain SGD, resumes exactly, and runs on
CUDA tensors with no host read."""
import io

import pytest
import torch
from torch import nn

from pirl_trainer.train import checkpoint, pirl
from pirl_trainer.train.config import ConfigError, OptimConfig, PirlConfig, load_config
from pirl_trainer.train.lars import LARS
from pirl_trainer.train.optimizers import OPTIMIZERS, build_optimizer, lars_param_groups
from tests.train.conftest import tiny_overrides
from tests.train.test_fake_cuda import HostRealMode, assert_on_cuda, to_fake_cuda


class Tiny(nn.Module):
    """A weight (2-d), a bias and a BatchNorm: the three kinds of parameter LARS tells apart."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1).double()  # weight (1, 2), bias (1,)
        self.bn = nn.BatchNorm1d(2).double()  # weight (2,), bias (2,)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: range, scheduler=None) -> None:
    """Steps on inputs drawn from the step number: two nets fed the same steps see the same data."""
    for step in steps:
        data = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad(set_to_none=True)
        net(data).square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_lars_two_momentum_steps_match_a_hand_computation():
    net = Tiny()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
        net.fc.bias.fill_(1.0)
        net.bn.weight.copy_(torch.tensor([1.0, 2.0]))
        net.bn.bias.zero_()
    optimizer = LARS(lars_param_groups(net, weight_decay=0.1, exclude_1d=True), lr=2.0, momentum=0.9, eta=0.01)
    grads = [  # (fc.weight, fc.bias, bn.weight) per step; bn.bias has no gradient and must not move
        ([[0.3, 0.4]], [0.5], [0.1, -0.2]),
        ([[-0.294, 0.098]], [0.25], [0.0, 0.1]),
    ]
    # Step 1: u = g + 0.1 w = (0.6, 0.8), ||u|| = 1, trust = 0.01 * 5 / 1 = 0.05; buffer = 0.05 u = (0.03, 0.04);
    #   w = (3, 4) - 2 (0.03, 0.04) = (2.94, 3.92). 1-d: buffer = g; b = 1 - 2 * 0.5 = 0; gamma = (0.8, 2.4).
    # Step 2: ||w|| = 4.9; u = g + 0.1 w = (0, 0.49), trust = 0.01 * 4.9 / 0.49 = 0.1; buffer = 0.9 (0.03, 0.04)
    #   + (0, 0.049) = (0.027, 0.085); w = (2.94 - 0.054, 3.92 - 0.17). 1-d: buffer b = 0.9 * 0.5 + 0.25 = 0.7,
    #   b = 0 - 1.4; buffer gamma = (0.09, -0.08), gamma = (0.8 - 0.18, 2.4 + 0.16).
    expected = [
        ([[2.94, 3.92]], [0.0], [0.8, 2.4]),
        ([[2.886, 3.75]], [-1.4], [0.62, 2.56]),
    ]
    for grad, want in zip(grads, expected):
        for p, g in zip((net.fc.weight, net.fc.bias, net.bn.weight), grad):
            p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        for p, w in zip((net.fc.weight, net.fc.bias, net.bn.weight), want):
            torch.testing.assert_close(p.detach(), torch.tensor(w, dtype=torch.float64))
        assert torch.equal(net.bn.bias, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(optimizer.state[net.fc.weight]["momentum_buffer"],
                               torch.tensor([[0.027, 0.085]], dtype=torch.float64))


def test_lars_trust_ratio_falls_back_to_one_for_a_zero_weight_or_a_zero_update():
    """SimCLR's fallback: a zero-initialised layer (||w|| = 0) takes a plain SGD step instead of none at all, and a
    zero update gives trust 1, not 0 / 0 = NaN."""
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.1, eta=0.001)
    w.grad = torch.tensor([[1.0, -2.0], [0.0, 4.0]], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(w.detach(), -0.5 * w.grad)  # trust 1, not 0.001 * 0 / ||g|| = 0
    before = w.detach().clone()
    optimizer.param_groups[0]["weight_decay"] = 0.0
    w.grad = torch.zeros_like(w)
    optimizer.step()
    assert torch.equal(w.detach(), before)


def stand_in_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: range, scheduler=None) -> None:
    """Steps on gradients drawn from (step, parameter number): two nets see the same gradients whatever their
    weights, so each kind of parameter can be compared alone."""
    for step in steps:
        generator = torch.Generator().manual_seed(1000 + step)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_lars_leaves_1d_parameters_to_plain_sgd_without_decay():
    """Biases and BatchNorm weights step exactly like torch.optim.SGD with no weight decay, through a changing
    rate; the weights do not (their steps are scaled by the trust ratio, with decay)."""
    lars_net, sgd_net = small_net(), small_net()
    cfg = OptimConfig(optimizer="lars", momentum=0.9, weight_decay=0.05, lars_eta=0.02)
    lars = build_optimizer(cfg, lars_net, peak_lr=0.3)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.3, momentum=0.9, weight_decay=0.0)
    factor = lambda step: 1.0 / (1 + step)  # noqa: E731 (the schedule scales every group's rate alike)
    stand_in_steps(lars_net, lars, range(4), torch.optim.lr_scheduler.LambdaLR(lars, factor))
    stand_in_steps(sgd_net, sgd, range(4), torch.optim.lr_scheduler.LambdaLR(sgd, factor))
    one_d = [name for name, p in lars_net.named_parameters() if p.ndim == 1]
    assert one_d == ["0.bias", "1.weight", "1.bias", "4.bias"]
    sgd_params = dict(sgd_net.named_parameters())
    for name, p in lars_net.named_parameters():
        if name in one_d:
            assert torch.equal(p, sgd_params[name]), name
        else:
            assert not torch.allclose(p, sgd_params[name]), name
    assert [g["adapt"] for g in lars.param_groups] == [True, False]
    assert [g["weight_decay"] for g in lars.param_groups] == [0.05, 0.0]
    assert [g["lr"] for g in lars.param_groups] == [0.3 / 5] * 2


def test_lars_without_the_exclusion_adapts_and_decays_every_parameter():
    net = small_net()
    optimizer = build_optimizer(OptimConfig(optimizer="lars", momentum=0.0, weight_decay=0.05, lars_eta=0.02,
                                            lars_exclude_1d=False), net, peak_lr=0.3)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["adapt"]
    bias = net[4].bias
    before = bias.detach().clone()
    stand_in_steps(net, optimizer, range(1))
    generator = torch.Generator().manual_seed(1000)  # stand_in_steps' draws for step 0, in parameter order
    grads = [torch.randn(p.shape, generator=generator) for p in net.parameters()]
    update = grads[-1] + 0.05 * before
    trust = 0.02 * before.norm() / update.norm()
    torch.testing.assert_close(bias.detach(), before - 0.3 * trust * update)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_bit_identical_to_the_plain_torch_sgd(nesterov):
    cfg = OptimConfig(momentum=0.9, weight_decay=1e-4, nesterov=nesterov)
    assert cfg.optimizer == "sgd"  # the default: every existing config trains as before
    built_net, plain_net = small_net(), small_net()
    built = build_optimizer(cfg, built_net, peak_lr=0.05)
    plain = torch.optim.SGD(plain_net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=nesterov)
    assert type(built) is torch.optim.SGD
    assert built.state_dict()["param_groups"] == plain.state_dict()["param_groups"]  # same groups, order, settings
    train_steps(built_net, built, range(3))
    train_steps(plain_net, plain, range(3))
    assert_same_weights(built_net, plain_net)
    assert not torch.equal(next(built_net.parameters()), next(small_net().parameters()))  # it did train


@pytest.mark.parametrize("name", ["adam", "LARS", "sgd_nesterov"])
def test_an_unknown_optimizer_is_a_config_error_naming_the_key_and_choices(tmp_path, name):
    cfg = load_config(PirlConfig, None, [f"--data.shards={tmp_path}", f"--optim.optimizer={name}"])
    with pytest.raises(ConfigError, match=r"optim\.optimizer must be one of \('sgd', 'lars'\)"):
        build_optimizer(cfg.optim, small_net(), peak_lr=0.1)
    assert OPTIMIZERS == ("sgd", "lars")


def test_a_non_positive_trust_coefficient_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim\.lars_eta must be > 0, got 0.0"):
        build_optimizer(OptimConfig(optimizer="lars", lars_eta=0.0), small_net(), peak_lr=0.1)


def test_lars_state_dict_round_trip_gives_identical_next_steps():
    """A resumed LARS (weights and optimiser state through torch.save / weights-only load, as checkpoints) takes
    the same next steps as the uninterrupted one; a fresh optimiser (no momentum) would not."""
    cfg = OptimConfig(optimizer="lars", momentum=0.9, weight_decay=1e-3, nesterov=True)
    net = small_net()
    optimizer = build_optimizer(cfg, net, peak_lr=0.5)
    train_steps(net, optimizer, range(2))
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_net, fresh_net = small_net(seed=1), small_net(seed=1)
    resumed = build_optimizer(cfg, resumed_net, peak_lr=0.5)
    resumed_net.load_state_dict(state["model"])
    resumed.load_state_dict(state["optimizer"])
    fresh_net.load_state_dict(state["model"])
    fresh = build_optimizer(cfg, fresh_net, peak_lr=0.5)
    train_steps(net, optimizer, range(2, 4))
    train_steps(resumed_net, resumed, range(2, 4))
    train_steps(fresh_net, fresh, range(2, 4))
    assert_same_weights(resumed_net, net)
    assert not torch.allclose(fresh_net[0].weight, net[0].weight)
    assert resumed.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


@pytest.mark.fake_cuda
def test_lars_steps_on_cuda_tensors_with_no_host_read():
    """On fake CUDA tensors (tests/train/test_fake_cuda.py): the trust ratio, the momentum and the update stay on
    the device; an `.item()` or `bool()` of a norm would raise here."""
    net = small_net()
    mode = HostRealMode()
    with mode:
        to_fake_cuda(net, mode)
        optimizer = build_optimizer(OptimConfig(optimizer="lars"), net, peak_lr=0.1)
        for _ in range(2):
            for p in net.parameters():
                p.grad = torch.ones_like(p)
            optimizer.step()
        assert_on_cuda(*net.parameters())
        assert_on_cuda(*(optimizer.state[p]["momentum_buffer"] for p in net.parameters()))


def test_a_lars_run_trains_checkpoints_and_resumes(synthetic_shards, tmp_path):
    """train/pirl.py with optim.optimizer=lars: the checkpoint holds LARS's two groups, and a run resumed from step
    3 ends on the uninterrupted run's weights."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    lars = ["--optim.optimizer=lars", "--optim.lr=1.2", "--run.max_steps=4"]
    pirl.main([*tiny_overrides(synthetic_shards, full), *lars])
    pirl.main([*tiny_overrides(synthetic_shards, broken), *lars[:2], "--run.max_steps=3"])
    pirl.main([*tiny_overrides(synthetic_shards, broken), *lars, "--resume"])
    a = checkpoint.load(checkpoint.checkpoint_path(full, 4))
    b = checkpoint.load(checkpoint.checkpoint_path(broken, 4))
    assert [(g["adapt"], g["weight_decay"], g["eta"]) for g in a["optimizer"]["param_groups"]] == [
        (True, 1e-4, 0.001), (False, 0.0, 0.001)]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
