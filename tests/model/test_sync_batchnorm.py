"""GlooSyncBatchNorm2d over 2 CPU processes (gloo) equals nn.BatchNorm2d on the concatenated batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pirl_trainer.model.sync_batchnorm import GlooSyncBatchNorm1d, GlooSyncBatchNorm2d, convert_sync_batchnorm


def _inputs():
    g = torch.Generator().manual_seed(0)
    # Channel 3 has a mean far larger than its spread, as real activations can: sum(x^2)/n - mean^2 loses it.
    x = torch.randn(6, 4, 5, 5, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.05]).view(1, 4, 1, 1)
    x = x + torch.tensor([1.0, -2.0, 0.0, 20.0]).view(1, 4, 1, 1)
    upstream = torch.randn(6, 4, 5, 5, generator=g)
    return x, upstream


def _reference():
    x, upstream = _inputs()
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 4))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    x.requires_grad_(True)
    out = bn(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, upstream = _inputs()
        rows = slice(rank * 4, 6) if rank else slice(0, 4)  # unequal shares: 4 and 2 samples
        bn = GlooSyncBatchNorm2d(4)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, 4))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 4))
        mine = x[rows].clone().requires_grad_(True)
        out = bn(mine)
        (out * upstream[rows]).sum().backward()
        # Parameter gradients are per rank; DDP would all-reduce (sum, then average) them.
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)
        results[rank] = (out.detach(), mine.grad, grads, bn.running_mean.clone(), bn.running_var.clone())
        dist.barrier()  # as tests/multiprocess.py: no rank leaves while another still reduces
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_batchnorm_over_the_whole_batch(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    out, grad_x, grad_w, grad_b, running_mean, running_var = _reference()
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), grad_x, rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][2], torch.cat([grad_w, grad_b]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank][3], running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank][4], running_var, rtol=1e-5, atol=1e-6)


def test_one_process_and_eval_mode_are_plain_batchnorm():
    x, _ = _inputs()
    plain, sync = nn.BatchNorm2d(4), GlooSyncBatchNorm2d(4)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    plain.eval(), sync.eval()
    torch.testing.assert_close(sync(x), plain(x))


def test_convert_replaces_every_batchnorm_and_keeps_its_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    net = convert_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(net[1], GlooSyncBatchNorm2d) and isinstance(net[2][0], GlooSyncBatchNorm2d)
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.25))


def _head_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g) * torch.tensor([2.0, 1.0, 0.5, 0.1, 3.0]) + torch.tensor([0.0, 5.0, -1, 9, 2])
    return x, torch.randn(6, 5, generator=g)


def _head_bn_rank(rank: int) -> tuple:
    """A head's BatchNorm1d (no affine, as model.head_norm=bn's) synchronised over 2 ranks holding 4 and 2 rows."""
    x, upstream = _head_inputs()
    rows = slice(4, 6) if rank else slice(0, 4)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(5, affine=False)), torch.device("cpu"))[0]
    assert isinstance(bn, GlooSyncBatchNorm1d)
    mine = x[rows].clone().requires_grad_(True)
    out = bn(mine)
    (out * upstream[rows]).sum().backward()
    return out.detach(), mine.grad, bn.running_mean.clone(), bn.running_var.clone()


def test_a_heads_batchnorm1d_over_two_processes_equals_one_process(tmp_path):
    from tests.multiprocess import run_on_ranks

    x, upstream = _head_inputs()
    bn = nn.BatchNorm1d(5, affine=False)
    x.requires_grad_(True)
    out = bn(x)
    (out * upstream).sum().backward()
    results = run_on_ranks(_head_bn_rank, 2, tmp_path)
    for rank, rows in ((0, slice(0, 4)), (1, slice(4, 6))):
        torch.testing.assert_close(results[rank][0], out.detach()[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank][1], x.grad[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank][2], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank][3], bn.running_var, rtol=1e-5, atol=1e-6)
