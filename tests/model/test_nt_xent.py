"""SimCLR's NT-Xent (model/losses.py nt_xent_loss): against a per-pair loop of the paper's formula, with padding
rows and a local offset, and the training loop's SimCLR step over 2 gloo processes (train/pair_methods.py,
train/ranks.py gather_with_grad) against one process holding the whole batch: the same loss and gradients."""
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pirl_trainer.model.losses import nt_xent_loss
from pirl_trainer.train.ranks import gather_with_grad
from tests.multiprocess import all_gather, run_on_ranks

TAU = 0.3


def loop_nt_xent(z1: torch.Tensor, z2: torch.Tensor, anchors: range, tau: float) -> torch.Tensor:
    """Algorithm 1 of SimCLR, pair by pair: views 2k and 2k+1 are sample k's; l(i, j) = -log exp(s_ij / tau) /
    sum_{k != i} exp(s_ik / tau); the mean of l over both views of the samples in `anchors`."""
    views = [v for k in range(len(z1)) for v in (z1[k], z2[k])]
    terms = []
    for k in anchors:
        for i, j in ((2 * k, 2 * k + 1), (2 * k + 1, 2 * k)):
            sim = [torch.dot(views[i], views[c]) / (views[i].norm() * views[c].norm()) for c in range(len(views))]
            denominator = sum(torch.exp(sim[c] / tau) for c in range(len(views)) if c != i)
            terms.append(-torch.log(torch.exp(sim[j] / tau) / denominator))
    return sum(terms) / len(terms)


def rows(n: int, dim: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit_rows(n: int, dim: int = 5, seed: int = 0) -> torch.Tensor:
    return F.normalize(rows(n, dim, seed), dim=1)


def test_loss_and_gradients_equal_the_per_pair_loop():
    """The loop scores cosine similarities of raw vectors; the loss takes them L2-normalised (as the heads give)."""
    x1, x2 = rows(6, seed=1).requires_grad_(), rows(6, seed=2).requires_grad_()
    z1, z2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    out = nt_xent_loss(z1, z2, z1, z2, 0, TAU)
    grads = torch.autograd.grad(out["loss"], (x1, x2))
    expected = loop_nt_xent(x1, x2, range(6), TAU)
    expected_grads = torch.autograd.grad(expected, (x1, x2))
    torch.testing.assert_close(out["loss"], expected.to(out["loss"].dtype), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert out["loss"].dtype == torch.float32  # computed in float32 whatever the input


def test_local_rows_at_an_offset_with_padding_score_the_whole_valid_batch():
    """Two processes' batches padded to 4 rows: samples 0..2 and a padding row, then samples 3..6. The second
    process's loss is the loop's over its anchors against the 7 samples, the padding never a candidate; the
    gradient reaches every sample's rows (through the gathered copies)."""
    full1, full2 = rows(7, seed=3).requires_grad_(), rows(7, seed=4).requires_grad_()
    pad = torch.full((1, 5), 9.0, dtype=torch.float64)  # far from unit norm: a padding row that scored would show
    all1 = torch.cat([F.normalize(full1[:3], dim=1), pad, F.normalize(full1[3:], dim=1)])
    all2 = torch.cat([F.normalize(full2[:3], dim=1), pad, F.normalize(full2[3:], dim=1)])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    out = nt_xent_loss(all1[4:], all2[4:], all1, all2, 4, TAU, valid)
    expected = loop_nt_xent(full1, full2, range(3, 7), TAU)
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(out["loss"], (full1, full2))
    want = torch.autograd.grad(expected, (full1, full2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
        assert g[:3].abs().sum() > 0  # the other process's samples are negatives: they get a gradient too
    assert torch.isfinite(out["loss"]) and out["pos"].shape == out["accuracy"].shape == (8,)


def test_pos_and_accuracy_say_whether_the_twin_ranks_first():
    z1 = torch.eye(4)
    out = nt_xent_loss(z1, z1.clone(), z1, z1.clone(), 0, 0.1)  # each twin identical: ranked first
    assert torch.equal(out["accuracy"], torch.ones(8)) and torch.equal(out["pos"], torch.ones(8))
    z2 = z1[[1, 0, 3, 2]]  # each twin orthogonal, another sample's view identical
    out = nt_xent_loss(z1, z2, z1, z2, 0, 0.1)
    assert torch.equal(out["accuracy"], torch.zeros(8)) and torch.equal(out["pos"], torch.zeros(8))
    # the loss is then -log(e^0 / (e^0 + e^10 + 5 e^0)) for every anchor (tau 0.1: one candidate at cosine 1)
    assert out["loss"].item() == pytest.approx(math.log(6 + math.exp(10)), rel=1e-6)


def test_bad_shapes_and_offsets_are_errors():
    z = unit_rows(3).float()
    with pytest.raises(ValueError, match="do not fit"):
        nt_xent_loss(z, z, z[:2], z[:2], 0, TAU)
    with pytest.raises(ValueError, match="do not fit"):
        nt_xent_loss(z[:2], z[:2], z, z, 2, TAU)
    with pytest.raises(ValueError, match="valid"):
        nt_xent_loss(z, z, z, z, 0, TAU, torch.ones(2, dtype=torch.bool))


# --- 2 processes (gloo) = 1 process with the global batch -----------------------------------------------------------
WORLD, DIM, FEATURES = 2, 6, 5
SIZES = (4, 3)  # samples per rank (an epoch's uneven last step); both pad to 5 rows, the loader's max_batch_size


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch's two views (7, FEATURES) and a shared linear layer's weight (DIM, FEATURES)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(7, FEATURES, generator=g), torch.randn(7, FEATURES, generator=g), torch.randn(DIM, FEATURES,
                                                                                                     generator=g)


def embed(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x @ weight.T, dim=1)


class PairNet(torch.nn.Module):
    """A stand-in for SimCLRNet: one linear layer, both views, unit-norm outputs."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embed(self.weight, view1), embed(self.weight, view2)


def _simclr_step(rank: int) -> dict:
    """The training loop's SimCLR step on this rank's share (train/pair_methods.py simclr_losses: padded to the
    loader's max_batch_size, gathered with gradients), weighted by its share, then DDP's gradient average."""
    from pirl_trainer.train.pair_methods import simclr_losses

    x1, x2, weight = inputs()
    net = PairNet(weight)
    start, n = sum(SIZES[:rank]), SIZES[rank]
    accelerator = SimpleNamespace(num_processes=WORLD, process_index=rank, gather=all_gather)
    cfg = SimpleNamespace(loss=SimpleNamespace(simclr_tau=TAU))
    out = simclr_losses(cfg, net, x1[start:start + n], x2[start:start + n], torch.arange(start, start + n),
                        nullcontext(), accelerator, max(SIZES) + 1)
    share = n / sum(SIZES)
    (out["loss"] * share * WORLD).backward()  # the training loop's weighting
    grad = net.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= WORLD  # DDP's gradient average
    return {"loss": out["loss"].detach(), "share": share, "grad": grad, "accuracy": out["accuracy"]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_ranks(_simclr_step, WORLD, tmp_path_factory.mktemp("nt_xent"))


@pytest.mark.slow  # two spawned processes importing the trainer: ~5 s on an idle 2-core machine
def test_two_processes_give_the_loss_and_gradient_of_one_with_the_global_batch(two_ranks):
    x1, x2, weight = inputs()
    weight.requires_grad_()
    z1, z2 = embed(weight, x1), embed(weight, x2)
    one = nt_xent_loss(z1, z2, z1, z2, 0, TAU)
    one["loss"].backward()
    two = sum(r["loss"] * r["share"] for r in two_ranks)
    torch.testing.assert_close(two, one["loss"].detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.cat([r["accuracy"] for r in two_ranks]),
                       torch.cat([one["accuracy"][:4], one["accuracy"][7:11], one["accuracy"][4:7],
                                  one["accuracy"][11:]]))  # anchors: rank 0's views 1 and 2, then rank 1's
    for r in two_ranks:  # every rank ends with the same averaged gradient, the single process's
        torch.testing.assert_close(r["grad"], weight.grad, rtol=1e-5, atol=1e-7)
    # without the gathered gradients (each rank's negatives detached) the gradient would differ by ~ its size
    assert weight.grad.abs().max() > 1e-3


def test_gather_with_grad_is_the_identity_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
