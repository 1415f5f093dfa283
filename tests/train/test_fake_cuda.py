"""Dry runs of the training step's CUDA paths without a GPU, in PyTorch's FakeTensorMode.

Fake tensors carry shape, dtype, device and strides but no data, so each run proves two things about the code
path it covers: no CPU tensor meets a CUDA one (FakeTensorDeviceMismatchError), and no device value is read on
the host (`.item()`, `.tolist()`, `bool(t)`, data-dependent shapes raise DataDependentOutputException or
DynamicOutputShapeException) — on a GPU each such read is a synchronisation that stalls the step.

`HostRealMode` fakes device work only: an operator whose tensors are all real CPU tensors (and which creates
nothing on CUDA) runs for real. That is the host side of the step, which reads host values by design:
- the batched stage plans on the host: draw_params from the host `index`, the view groups, `_rows`, the gray
  masks (pipelines/augment.py); only the pixel kernels run on the device;
- the jigsaw order and the covariant targets are drawn from host counters, then copied to the device.
The reads the training loop makes of device values, all outside a plain step (train/pirl.py):
- before the first step: `bool(torch.isnan(log_z))`, whether the binary-NCE constant is still to be estimated
  (the estimate itself, global_log_z, stays on the device);
- on log steps: window_sums' `.tolist()` of the summed window (then check_finite on host floats), and with
  several processes the stop flag's `.item()` (StopOnSigterm.requested);
- on checkpoint steps: window_sums again, so that no checkpoint holds NaN weights;
- on kNN steps: the monitor's score (knn_top1's `.item()` and its class count).
The step below is a plain step (no log, checkpoint or kNN) and makes none of them.

Not dry-run here, with the reason:
- autograd's backward: its engine asks the CUDA driver for a device context, which fake mode has no stand-in
  for ("hasPrimaryContext expects a valid device index"); the optimiser step runs on stand-in gradients instead;
- data.augment_kernels=compiled: torch.compile of the pixel kernels needs a real device to build them for;
- the sharded bank's exchanges between processes (one process owns every row here: its local parts only).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from pirl_trainer.model.covariant import classification_loss
from pirl_trainer.model.sharded_bank import ShardedMemoryBank
from pirl_trainer.train import knn_monitor
from pirl_trainer.train import pirl as trainer
from pirl_trainer.train.config import PirlConfig, load_config
from pirl_trainer.train.knn_monitor import KnnMonitor
from pirl_trainer.train.linear_probe import extract_features, stage_features
from pirl_trainer.train.methods import CONTRASTIVE, METHODS, build_net, covariant_target
from pirl_trainer.train.pair_methods import PAIR_METHODS, after_step, build_momentum_keys
from pirl_trainer.train.ranks import gather_rows

from .conftest import tiny_overrides

pytestmark = pytest.mark.fake_cuda

METHOD_CONFIGS = "train/configs/methods"
CUDA = torch.device("cuda", 0)


def _cuda_factory(kwargs: dict) -> bool:
    device = kwargs.get("device")
    return device is not None and torch.device(device).type != "cpu"


class HostRealMode(FakeTensorMode):
    """FakeTensorMode for device tensors; operators on real CPU tensors alone run for real (the host plan)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)  # a real CPU tensor meeting a fake CUDA one: a device error

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor)]
        host = all(not isinstance(t, FakeTensor) and t.device.type == "cpu" for t in tensors)
        if host and not _cuda_factory(kwargs):  # `device=` also names a copy's target: .to("cuda") is faked
            return func(*args, **kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def bf16_autocast_without_a_gpu(monkeypatch):
    """torch.autocast("cuda") turns itself off where no GPU is found; on fake CUDA tensors its casts still run."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    yield torch.autocast("cuda", dtype=torch.bfloat16)


def to_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """What accelerator.prepare's `.to(device)` does, on fake tensors: every parameter and buffer to CUDA, its
    strides (channels_last) kept. Module.to cannot do it: it swaps tensors, which fake tensors refuse."""
    with torch.no_grad():
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p).to(CUDA), p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = mode.from_tensor(b).to(CUDA)
    return module


def config(method: str, shards, out_dir, *extra: str) -> PirlConfig:
    small_queue = ["--loss.moco_queue_size=20", "--loss.moco_bn_groups=2"] if method == "moco" else []  # 30 samples
    return load_config(PirlConfig, f"{METHOD_CONFIGS}/{method}.yaml",
                       [*tiny_overrides(shards, out_dir), "--run.channels_last=true", "--run.bf16=true", *small_queue,
                        *extra])


def loader_batch(cfg: PirlConfig, mode: str = "pretrain") -> tuple:
    one = SimpleNamespace(process_index=0, num_processes=1)
    loader = trainer.build_loader(cfg, one, mode=mode)
    loader.set_epoch(0)
    return loader, next(iter(loader))


def assert_on_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device == CUDA, (type(t), t.device)


def training_step(cfg: PirlConfig, loader, batch: dict, mode: HostRealMode, autocast, bank=None) -> dict:
    """train/pirl.py's step body, a plain step on fake CUDA: copy, batched stage, forward, negatives, loss, then
    the optimiser step on stand-in gradients (no backward, see the module docstring) and the bank update."""
    one = SimpleNamespace(num_processes=1, process_index=0)
    net = build_net(cfg, loader.classes if loader.labelled else None)
    net = net.to(memory_format=torch.channels_last)  # as train() does, before accelerator.prepare
    keys = (build_momentum_keys(cfg, net, SimpleNamespace(num_processes=1, device=torch.device("cpu")), loader)
            if cfg.method == "moco" else None)
    augment = trainer.build_augment(cfg)
    assert augment.kernels in ("auto", "tensor")  # on CUDA "auto" is the tensor kernels (numba is CPU only)
    step, epoch = 3, 0
    convs = []  # (input in channels_last, output dtype) of the trunk's first convolution, per trunk pass
    net.trunk.conv1.register_forward_hook(lambda m, args, out: convs.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))
    with mode:
        to_fake_cuda(net, mode)
        if keys is not None:
            to_fake_cuda(keys, mode)
        net.train()
        batch = trainer.to_device(batch, CUDA)  # the host -> device copy of the loader batch
        assert_on_cuda(batch["image"], batch["patches"])
        assert not isinstance(batch["index"], FakeTensor)  # the host copy, for the stage's draws
        index = batch["index"].to(CUDA, non_blocking=True)
        batch = augment(batch, epoch)
        image, patches = batch["image"], batch["patches"]
        assert_on_cuda(image, patches)
        assert image.dtype == patches.dtype == torch.float32
        image = image.contiguous(memory_format=torch.channels_last)
        if cfg.method in CONTRASTIVE:
            if bank is None:
                bank = to_fake_cuda(trainer.build_bank(cfg, loader.num_samples, torch.device("cpu")), mode)
            log_z = torch.tensor(float("nan")).to(CUDA)
            need_log_z = cfg.loss.kind == "nce"  # the first step's estimate: on the device, no host read
            losses, log_z = trainer.contrastive_losses(cfg, net, bank, image, patches, batch["index"], index, step,
                                                       autocast, one, loader, log_z, need_log_z)
            assert_on_cuda(losses["loss"], losses["f_img"], log_z)
            assert losses["f_img"].shape == (len(index), cfg.model.embed_dim)
            rows, feats = gather_rows(one, index, losses["f_img"], loader.max_batch_size)
            bank.update(rows, feats, momentum=cfg.loss.bank_momentum)
            assert_on_cuda(bank.fetch(index))
        elif cfg.method in PAIR_METHODS:
            losses = trainer.pair_losses(cfg, net, keys, image, patches, index, step, autocast, one, loader)
        else:
            target = covariant_target(cfg, step, epoch, index, batch.get("label"))
            assert_on_cuda(target)
            views = image[:, None] if cfg.method == "supervised" else patches
            with autocast:
                logits = net(views, target if cfg.method == "jigsaw" else None)
            assert logits.dtype == torch.bfloat16  # the autocast really ran in bf16
            losses = classification_loss(logits, target)
        assert_on_cuda(losses["loss"])
        assert losses["loss"].shape == ()
        # one trunk pass per view (pirl: the image, then the patches), each in bf16; the image in channels_last
        assert [dtype for _, dtype in convs] == [torch.bfloat16] * (2 if cfg.method == "pirl" else 1)
        if cfg.method in ("pirl", "npid", "supervised", "simclr", "moco"):
            assert convs[0][0]
        # the optimiser step on the gradients' device: SGD's foreach kernels (backward itself cannot run here)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=cfg.optim.momentum,
                                    weight_decay=cfg.optim.weight_decay)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert_on_cuda(*(optimizer.state[p]["momentum_buffer"] for p in net.parameters()))
        if keys is not None:  # MoCo after the step: the key encoder's EMA, the keys into the queue
            after_step(keys, net, losses)
            assert_on_cuda(keys.queue, keys.pointer, *keys.encoder.parameters())
        for key in trainer.LOG_TERMS[cfg.method]:  # the window's running sums stay on the device
            assert_on_cuda(losses[key].detach().mean() * 0.5)
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_runs_on_cuda_with_no_host_read(synthetic_shards, tmp_path, monkeypatch, method):
    cfg = config(method, synthetic_shards, tmp_path)
    loader, batch = loader_batch(cfg)
    with bf16_autocast_without_a_gpu(monkeypatch) as autocast:
        training_step(cfg, loader, batch, HostRealMode(), autocast)


@pytest.mark.parametrize("options", [("--loss.shared_negatives=true",), ("--loss.kind=infonce",),
                                     ("--loss.bank_dtype=bfloat16",), ("--data.augment_kernels=tensor",),
                                     ("--data.recipe.jigsaw_view=rotation",),
                                     ("--data.recipe.jigsaw_view=rotation_jigsaw",)])
def test_pirl_step_variants_run_on_cuda(synthetic_shards, tmp_path, monkeypatch, options):
    cfg = config("pirl", synthetic_shards, tmp_path, *options)
    loader, batch = loader_batch(cfg)
    with bf16_autocast_without_a_gpu(monkeypatch) as autocast:
        training_step(cfg, loader, batch, HostRealMode(), autocast)


@pytest.mark.parametrize("shared", [False, True])
def test_the_sharded_banks_local_parts_run_on_cuda(synthetic_shards, tmp_path, monkeypatch, shared):
    """One process owns every row; draw, fetch, negatives and update on its CUDA shard."""
    cfg = config("pirl", synthetic_shards, tmp_path, f"--loss.shared_negatives={str(shared).lower()}")
    loader, batch = loader_batch(cfg)
    mode = HostRealMode()
    with mode:
        bank = ShardedMemoryBank(loader.num_samples, cfg.model.embed_dim, init_seed=0, device=CUDA)
    assert_on_cuda(bank.shard)
    with bf16_autocast_without_a_gpu(monkeypatch) as autocast:
        training_step(cfg, loader, batch, mode, autocast, bank=bank)


@pytest.mark.parametrize("kind", ["replicated", "sharded"])
def test_the_banks_initialisation_from_features_runs_on_cuda(synthetic_shards, tmp_path, kind):
    """loss.bank_init=features: every row from the initial network's centre-crop features, on the device."""
    cfg = config("pirl", synthetic_shards, tmp_path, "--loss.bank_init=features", f"--loss.bank={kind}")
    net = build_net(cfg).to(memory_format=torch.channels_last)
    accelerator = SimpleNamespace(device=CUDA, process_index=0, num_processes=1, is_main_process=True)
    mode = HostRealMode()
    with mode:
        to_fake_cuda(net, mode)
        bank = trainer.build_bank(cfg, 30, CUDA) if kind == "sharded" else to_fake_cuda(
            trainer.build_bank(cfg, 30, torch.device("cpu")), mode)  # the synthetic shards' 30 samples
        trainer.init_bank_from_features(net, bank, cfg, accelerator)
        rows = bank.fetch(torch.arange(30))
    assert_on_cuda(rows)
    assert rows.shape == (30, cfg.model.embed_dim)


def test_knn_monitor_and_linear_probe_feature_forward_run_on_cuda(synthetic_shards, tmp_path, monkeypatch):
    """The monitor's evaluate (host batches converted and fed on the device) and its vote; the probe's
    multi-stage feature pass. The score's `.item()` (knn_top1) is the evaluation's one host read, allowed."""
    cfg = config("pirl", synthetic_shards, tmp_path)
    monitor = KnnMonitor(str(synthetic_shards), str(synthetic_shards), cfg.data.recipe, batch_size=8,
                         num_workers=0, k=5, max_test=10)
    scored = {}
    monkeypatch.setattr(knn_monitor, "knn_top1", lambda *args: scored.setdefault("args", args) and 0.0)
    trunk = build_net(cfg).to(memory_format=torch.channels_last).trunk
    mode = HostRealMode()
    with mode:
        to_fake_cuda(trunk, mode)
        trunk.train()
        monitor.evaluate(trunk, CUDA)
        assert trunk.training  # restored after the eval-mode pass
        train, y_train, test, y_test, k, temperature = scored["args"]
        votes = knn_monitor.knn_votes(train, y_train, test, len(monitor.train_loader.classes), k, temperature)
        loader, _ = loader_batch(cfg, mode="eval")
        probe, labels = extract_features(lambda image: stage_features(trunk, image, ["res4", "res5"]),
                                         loader, cfg.data.recipe, device=CUDA)
    assert_on_cuda(train, y_train, test, y_test, votes, labels, probe["res4"], probe["res5"])
    assert train.shape[0] == y_train.shape[0] == monitor.train_loader.num_samples
    assert test.shape[0] == y_test.shape[0] == 10
    assert votes.shape == (10, len(monitor.train_loader.classes))
    assert probe["res5"].shape[0] == probe["res4"].shape[0] == labels.shape[0] == loader.num_samples


def test_the_dry_run_catches_a_host_read_and_a_cpu_tensor_on_cuda():
    """The two faults the dry runs exist to find are errors in this mode, while host work runs for real."""
    mode = HostRealMode()
    with mode:
        host = torch.arange(4)
        assert host.sum().item() == 6  # host values: real
        x = host.to(CUDA)
        assert_on_cuda(x)
        with pytest.raises(DataDependentOutputException):
            x.sum().item()
        with pytest.raises(DataDependentOutputException):
            bool(x.any())
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            x + host
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            torch.ones(4, device=CUDA).index_select(0, host)
        assert_on_cuda(x + torch.tensor(2.0))  # a 0-dim CPU tensor is a scalar, as on a real GPU
