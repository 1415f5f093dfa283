"""PIRL pretraining: `accelerate launch train/pirl.py --config train/configs/NAME.yaml [--section.key=value ...]`.

One loop, top to bottom: set-up, then for each step: data, forward, negatives from the memory bank, loss,
backward, optimiser step, bank update. Host syncs (`.item()`) happen on log steps only. The baselines (`method`:
npid, jigsaw, rotation, supervised, simclr, moco; train/methods.py) run through the same loop; the classification
ones skip the bank, simclr and moco (train/pair_methods.py) have their own negatives.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.profiler import record_function
from tqdm import tqdm

from pirl_trainer import pipelines
from pirl_trainer.model.covariant import classification_loss
from pirl_trainer.model.losses import negative_similarities, pirl_loss
from pirl_trainer.model.memory_bank import MemoryBank, check_num_negatives
from pirl_trainer.model.sharded_bank import ShardedMemoryBank
from pirl_trainer.model.sync_batchnorm import convert_sync_batchnorm
from pirl_trainer.pipelines.augment import KERNEL_CHOICES, BatchAugment
from pirl_trainer.pipelines.device_decode import DECODE_DEVICES
from pirl_trainer.common.rng import PURPOSE_HEADS, counter_uniform, derive_seed
from pirl_trainer.pipelines.shard_index import data_files, verify_checksums
from pirl_trainer.pipelines.subset import SubsetError, resolve_subset
from pirl_trainer.train import checkpoint
from pirl_trainer.train.classifier_eval import ClassifierEval, due
from pirl_trainer.train.config import ConfigError, PirlConfig, config_from_cli, to_dict, to_yaml
from pirl_trainer.train.knn_monitor import KnnMonitor
from pirl_trainer.train.methods import (CONTRASTIVE, LOG_TERMS, build_net, check_method, covariant_target, init_trunk,
                                       unused_parameters)
from pirl_trainer.train.optimizers import build_optimizer
from pirl_trainer.train.pair_methods import PAIR_METHODS, after_step, build_momentum_keys, pair_losses
from pirl_trainer.train.preemption import StopOnSigterm
from pirl_trainer.train.ranks import gather_rows, global_index, global_log_z
from pirl_trainer.train.run_log import RunLog
from pirl_trainer.train.schedule import lr_factor, scaled_lr, step_lr_factor


BANK_KINDS = ("replicated", "sharded")
BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_bank(cfg: PirlConfig, num_rows: int, device: torch.device):
    """The memory bank of loss.bank / loss.bank_dtype. Replicated rows start from the global RNG (seeded by the
    caller); sharded rows from counter draws keyed by the seed, since each rank builds only its own rows."""
    dtype = BANK_DTYPES[cfg.loss.bank_dtype]
    if cfg.loss.bank == "sharded":
        return ShardedMemoryBank(num_rows, cfg.model.embed_dim, dtype=dtype, init_seed=cfg.run.seed, device=device)
    return MemoryBank(num_rows, cfg.model.embed_dim, dtype=dtype).to(device)


def backend_options(cfg: PirlConfig, device: torch.device | None = None) -> dict:
    """Keyword arguments only the configured backend takes. `device`: the training device, where
    data.decode_device=cuda decodes (each rank on its own GPU)."""
    decode = cfg.data.decode_device
    if decode not in DECODE_DEVICES:
        raise ConfigError(f"data.decode_device must be one of {DECODE_DEVICES}, got {decode!r}")
    if cfg.data.backend == "reference":
        if decode == "cuda" and device is not None and device.type != "cuda":
            raise ConfigError(f"data.decode_device=cuda decodes on the training GPU, but this run trains on {device} "
                              "(run.cpu=true, or no CUDA device): set data.decode_device=cpu or workers")
        return {"decode_device": device if decode == "cuda" and device is not None else decode}
    if decode != "workers":
        raise ConfigError(f"data.decode_device={decode} applies to data.backend=reference only; data.backend="
                          f"{cfg.data.backend} decodes its own way (DALI's device: data.dali.decode_device)")
    return {"dali": {"options": cfg.data.dali}, "ffcv": {"os_cache": cfg.data.ffcv_os_cache}}.get(cfg.data.backend, {})


def build_loader(cfg: PirlConfig, accelerator: Accelerator, mode: str = "pretrain"):
    """This rank's loader over the training data (data.subset / data.subset_fraction applied: its epochs cover the
    subset alone). Never passed to accelerator.prepare(): every backend already shards by rank."""
    loader = pipelines.make_loader(
        cfg.data.backend,
        cfg.data.shards,
        cfg.data.recipe,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.run.seed,
        mode=mode,
        **backend_options(cfg, accelerator.device if cfg.data.decode_device == "cuda" else None),
    )
    loader.max_skipped_per_epoch = cfg.data.max_skipped_per_epoch
    try:
        subset, summary = resolve_subset(loader, cfg.data.shards, path=cfg.data.subset,
                                         fraction=cfg.data.subset_fraction, seed=cfg.data.subset_seed)
        if subset is not None:
            loader.set_subset(subset)
    except (SubsetError, NotImplementedError) as err:
        raise ConfigError(f"data.subset / data.subset_fraction: {err}") from None
    if subset is not None and mode == "pretrain":
        accelerator.print(f"training subset: {summary}")
    return loader


def build_augment(cfg: PirlConfig) -> BatchAugment:
    """The batched stage every backend's loader batch goes through on the training device."""
    return BatchAugment(cfg.data.recipe, seed=cfg.run.seed, kernels=cfg.data.augment_kernels)


def to_device(batch: dict, device: torch.device) -> dict:
    """Pixels (and labels) to the training device; `index` stays on the host too, for the stage's draws."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("image", "patches", "label")}
    out["index"] = batch["index"]
    return out


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the steps, the terms and the last checkpoint."""

    def __init__(self, terms: dict, first: int, last: int, out_dir: Path):
        bad = ", ".join(f"{k} = {float(v):g}" for k, v in terms.items()
                        if k.startswith("loss") and not math.isfinite(float(v)))
        steps = f"step {last}" if first >= last else f"steps {first}-{last}"
        latest = checkpoint.latest_checkpoint(out_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss in {steps} ({bad}; the forward pass and the loss, before the optimiser step): "
            f"training stopped; {kept}. Lower optim.lr, or try run.bf16=false"
        )


def window_sums(accelerator: Accelerator, window: dict, device: torch.device) -> dict[str, float]:
    """The log window's per-term sums over every rank (one all-reduce and one host sync)."""
    sums = accelerator.reduce(torch.stack([torch.as_tensor(v, device=device) for v in window.values()]), "sum")
    return dict(zip(window, sums.tolist()))


def check_finite(sums: dict[str, float], first: int, last: int, out_dir: Path) -> None:
    """Raise NonFiniteLoss when a term of the steps first..last was not finite. Every rank sees the same sums
    (window_sums), so every rank stops; called before every checkpoint too, so none holds NaN weights."""
    if not all(math.isfinite(v) for v in sums.values()):
        raise NonFiniteLoss(sums, first, last, out_dir)


def verify_data(shard_dir: str, accelerator: Accelerator) -> None:
    """data.verify_sha256: every data file against its manifest's sha256, before anything trains (each node
    reads its own copy, so each node's local rank 0 checks it)."""
    if accelerator.is_local_main_process:
        files = data_files(shard_dir)
        with tqdm(total=sum(size for _, size, _ in files), unit="B", unit_scale=True, desc="sha256") as bar:
            verify_checksums(shard_dir, progress=bar.update)
    accelerator.wait_for_everyone()


def patch_orders(seed: int, step: int, index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, num_patches) permutations for the jigsaw head, a function of (seed, step, global index): the same for
    a sample whichever rank or batch holds it (argsort of counter-based uniforms is a uniform permutation)."""
    return counter_uniform(derive_seed(PURPOSE_HEADS, seed, step), index, num_patches).argsort(dim=1)


def contrastive_losses(cfg: PirlConfig, net, bank, image, patches, host_index, index, step: int, autocast,
                       accelerator: Accelerator, loader, log_z: torch.Tensor, need_log_z: bool):
    """PIRL's (or NPID++'s) step up to the loss: forward, negatives from the bank, eq. 5. Returns (losses, log_z)
    with losses["f_img"] the detached image embeddings for the bank update."""
    npid = cfg.method == "npid"
    order = None
    if not npid:
        order = patch_orders(cfg.run.seed, step, host_index, cfg.data.recipe.view_tiles)
        order = order.to(image.device, non_blocking=True)
    with autocast:
        f_img, g_jig = net(image, None if npid else patches, patch_order=order)  # (B, 128) each, unit norm
    f_img = f_img.float()
    g_jig = None if g_jig is None else g_jig.float()
    with record_function("negatives_draw"):
        # A function of (seed, step, global index), or for a shared draw of the global batch: the same
        # negatives whatever the rank or the process count.
        shared = cfg.loss.shared_negatives
        exclude = global_index(accelerator, index, loader.max_batch_size) if shared else None
        neg_rows = bank.draw_negatives(index, cfg.loss.num_negatives, shared=shared,
                                       seed=cfg.run.seed, step=step, exclude=exclude)
    bank_pos = bank.fetch(index)  # (B, 128): m_I
    bank_neg = bank.negatives(neg_rows)  # m_I': rows and ids, never a (B, K, 128) copy where avoidable
    if need_log_z:
        with torch.no_grad():
            pos = (f_img * bank_pos).sum(-1)
            neg = negative_similarities(f_img.unsqueeze(0), bank_neg)[0]
            log_z = global_log_z(accelerator, pos, neg, cfg.loss.tau, loader.num_samples)
    with record_function("loss"):
        losses = pirl_loss(
            bank_pos, g_jig, f_img, bank_neg,
            lam=0.0 if npid else cfg.loss.lam, tau=cfg.loss.tau, kind=cfg.loss.kind,
            log_z=log_z if cfg.loss.kind == "nce" else None, num_data=loader.num_samples,
        )
    losses["f_img"] = f_img.detach()
    return losses, log_z


def build_knn_monitor(cfg: PirlConfig) -> KnnMonitor:
    """knn.*: the monitor's two eval loaders, built once (a bad path fails before the first step)."""
    k = cfg.knn
    return KnnMonitor(k.train_shards or cfg.data.shards, k.test_shards, cfg.data.recipe, backend=cfg.data.backend,
                      batch_size=k.batch_size, num_workers=cfg.data.num_workers, k=k.k, temperature=k.temperature,
                      max_train=k.max_train or None, max_test=k.max_test or None)


@torch.no_grad()
def init_bank_from_features(net, bank: MemoryBank, cfg: PirlConfig, accelerator: Accelerator) -> None:
    """Fill every bank row with f(v_I) of the initial network on the centre-cropped image.

    With random rows the first epoch pulls each image towards a random target and the NCE constant Z is
    estimated on near-zero similarities; on small CPU runs that drives the embeddings to collapse (measured:
    docs/training.md, "Short schedules on a CPU"). BatchNorm uses batch statistics here, as in training.
    """
    loader = build_loader(cfg, accelerator, mode="eval")
    loader.set_epoch(0)
    augment = build_augment(cfg)
    net.train()
    for batch in tqdm(loader, desc="bank init", unit="batch", disable=not accelerator.is_main_process, leave=False):
        index = batch["index"].to(accelerator.device)
        feats = net.image_embedding(augment.eval(to_device(batch, accelerator.device))["image"])
        rows, feats = gather_rows(accelerator, index, feats.float(), loader.max_batch_size)
        bank.update(rows, feats, momentum=0.0)


def next_batch(batches) -> tuple[dict | None, float]:
    """The loader's next batch (None at the end of the epoch) and the seconds the loop waited for it, timed as the
    profiler's data_wait phase."""
    wait_start = time.perf_counter()
    with record_function("data_wait"):
        batch = next(batches, None)
    return batch, time.perf_counter() - wait_start


def load_resume_state(resume: str, out_dir: Path) -> tuple[Path, dict]:
    """--resume's checkpoint (a path, or "latest": the newest in out_dir) and its loaded state."""
    path = checkpoint.latest_checkpoint(out_dir) if resume == "latest" else Path(resume)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / checkpoint.CHECKPOINT_DIR}")
    return path, checkpoint.load(path)


def check_resume_data(accelerator: Accelerator, path: Path, state: dict, shards: str, num_samples: int,
                      batch_size: int, batch_key: str = "data.batch_size") -> None:
    """A checkpoint of a run on another number of samples is refused; one of another global batch continues,
    with a warning (steps then count in the new batches). batch_size: this run's per process, set by `batch_key`."""
    if state["num_samples"] != num_samples:
        raise ValueError(f"{path} was trained on {state['num_samples']} samples, {shards} holds {num_samples}")
    saved_batch = state.get("global_batch", state["world_size"] * batch_size)
    global_batch = batch_size * accelerator.num_processes
    if saved_batch != global_batch:
        accelerator.print(
            f"warning: {path} was trained with a global batch of {saved_batch} ({state['world_size']} "
            f"processes), this run has {global_batch}: steps, epochs and the learning-rate schedule now count "
            f"in batches of {global_batch}; keep world_size x {batch_key} to continue the same run"
        )


def train(cfg: PirlConfig, resume: str | None = None, profiler=None) -> dict:
    """Runs the configured schedule (or up to run.max_steps); returns the final step's logged record.

    `profiler`: a torch.profiler.profile whose step() is called after every training step (tools/profile.py).
    """
    cfg.data.recipe.validate()
    if cfg.loss.kind not in ("nce", "infonce"):
        raise ConfigError(f"loss.kind must be 'nce' or 'infonce', got {cfg.loss.kind!r}")
    if cfg.data.augment_kernels not in KERNEL_CHOICES:
        raise ConfigError(f"data.augment_kernels must be one of {KERNEL_CHOICES}, got {cfg.data.augment_kernels!r}")
    if cfg.data.backend not in pipelines.BACKENDS:
        raise ConfigError(f"data.backend must be one of {sorted(pipelines.BACKENDS)}, got {cfg.data.backend!r}")
    try:
        cfg.data.dali.validate()
    except ValueError as err:
        raise ConfigError(f"data.{err}") from None
    if cfg.loss.bank not in BANK_KINDS:
        raise ConfigError(f"loss.bank must be one of {BANK_KINDS}, got {cfg.loss.bank!r}")
    if cfg.loss.bank_dtype not in BANK_DTYPES:
        raise ConfigError(f"loss.bank_dtype must be one of {tuple(BANK_DTYPES)}, got {cfg.loss.bank_dtype!r}")
    if cfg.data.max_skipped_per_epoch < 0:
        raise ConfigError(f"data.max_skipped_per_epoch must be >= 0, got {cfg.data.max_skipped_per_epoch}")
    check_method(cfg)
    if cfg.knn.every < 0 or (cfg.knn.every > 0 and not cfg.knn.test_shards):
        raise ConfigError(f"knn.every must be >= 0 and, when > 0, knn.test_shards set (got every={cfg.knn.every}, "
                          f"test_shards={cfg.knn.test_shards!r})")
    if cfg.loss.bank_init not in ("random", "features"):
        raise ConfigError(f"loss.bank_init must be 'random' or 'features', got {cfg.loss.bank_init!r}")
    if any(epoch <= 0 for epoch in cfg.optim.lr_steps):
        raise ConfigError(f"optim.lr_steps must be epochs > 0, got {list(cfg.optim.lr_steps)}")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=unused_parameters(cfg))
    accelerator = Accelerator(cpu=cfg.run.cpu, kwargs_handlers=[ddp])
    device = accelerator.device
    out_dir = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)  # same on every rank: identical initial weights and bank

    if cfg.data.verify_sha256:
        verify_data(cfg.data.shards, accelerator)
    loader = build_loader(cfg, accelerator)
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    global_batch = cfg.data.batch_size * accelerator.num_processes

    augment = build_augment(cfg)
    contrastive = cfg.method in CONTRASTIVE
    net = build_net(cfg, loader.classes if loader.labelled else None)
    if cfg.model.init_checkpoint and resume is None:  # a resumed run restores its own trunk
        init_trunk(net, cfg.model.init_checkpoint, cfg.model.arch)
        accelerator.print(f"trunk initialised from {cfg.model.init_checkpoint}")
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        net = convert_sync_batchnorm(net, device)
    if cfg.run.channels_last:
        net = net.to(memory_format=torch.channels_last)
    bank = build_bank(cfg, loader.num_samples, device) if contrastive else None
    # MoCo's key encoder and queue: replicated on every rank, outside the DDP-wrapped module (model/moco.py)
    momentum_keys = build_momentum_keys(cfg, net, accelerator, loader) if cfg.method == "moco" else None
    if contrastive:
        try:  # before the bank's initialisation and the first step, not at the first draw
            check_num_negatives(cfg.loss.num_negatives, loader.num_samples)
        except ValueError as err:
            raise ConfigError(f"loss.num_negatives = {cfg.loss.num_negatives} does not fit {cfg.data.shards} "
                              f"({loader.num_samples} samples): {err}") from None
    peak_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_batch)
    optimizer = build_optimizer(cfg.optim, net, peak_lr)
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    final_ratio = cfg.optim.final_lr / cfg.optim.lr
    drops = [round(epoch * steps_per_epoch) for epoch in cfg.optim.lr_steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: step_lr_factor(s, warmup_steps, drops) if drops else
        lr_factor(s, total_steps, warmup_steps, final_ratio)
    )
    log_z = torch.tensor(float("nan"))  # Wu et al.'s constant, estimated on the first step (binary NCE only)

    global_step = 0
    if resume is not None:
        path, state = load_resume_state(resume, out_dir)
        check_resume_data(accelerator, path, state, cfg.data.shards, loader.num_samples, cfg.data.batch_size)
        trained = state["config"].get("method", "pirl")
        if trained != cfg.method:
            raise ValueError(f"{path} was trained with method={trained}, this run has method={cfg.method}")
        if state.get("epoch_samples", state["num_samples"]) != loader.epoch_samples:
            raise ValueError(f"{path} was trained on epochs of {state.get('epoch_samples', state['num_samples'])} "
                             f"samples, this run's data.subset / data.subset_fraction give {loader.epoch_samples}")
        net.load_state_dict(state["model"])
        if bank is not None:
            bank.load_state_dict(state["bank"])
        if momentum_keys is not None:
            momentum_keys.load_state_dict(state["moco"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log_z = state["log_z"]
        global_step = state["step"]
        checkpoint.restore_rng_state(state["rng"])
        accelerator.print(f"resumed from {path} at step {global_step}")
    elif contrastive and cfg.loss.bank_init == "features":
        init_bank_from_features(net.to(device), bank, cfg, accelerator)

    net, optimizer = accelerator.prepare(net, optimizer)
    log_z = log_z.to(device)
    need_log_z = cfg.loss.kind == "nce" and bool(torch.isnan(log_z))
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    run_log = RunLog(out_dir, cfg.run.tensorboard) if accelerator.is_main_process else None

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        # collective for a sharded bank: every rank calls it, rank 0 gets the rows
        bank_state = bank.state_dict() if bank is not None else None
        if accelerator.is_main_process:
            state = {
                "model": accelerator.unwrap_model(net).state_dict(),
                "bank": bank_state,
                "moco": momentum_keys.state_dict() if momentum_keys is not None else None,  # the same on every rank
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "log_z": log_z.cpu(),
                "step": step,
                "epoch": step // steps_per_epoch,
                "step_in_epoch": step % steps_per_epoch,
                "world_size": accelerator.num_processes,
                "global_batch": global_batch,
                "num_samples": loader.num_samples,
                "epoch_samples": loader.epoch_samples,  # the subset's size, where data.subset* set one
                "rng": checkpoint.rng_state(),
                "config": to_dict(cfg),
            }
            checkpoint.save_atomic(state, checkpoint.checkpoint_path(out_dir, step))

    last_step = total_steps if cfg.run.max_steps < 0 else min(total_steps, cfg.run.max_steps)
    progress = tqdm(
        total=last_step, initial=global_step, disable=not accelerator.is_main_process, unit="step", dynamic_ncols=True
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.bf16)
    # Means over the log window; pos_/neg_ are the cosine similarities to m_I and to the bank negatives m_I'.
    window = dict.fromkeys(LOG_TERMS[cfg.method], 0.0)
    knn = build_knn_monitor(cfg) if cfg.knn.every > 0 and accelerator.is_main_process else None
    postfix: dict = {}
    knn_shown: dict = {}  # the last kNN top-1, kept in the progress line until the next evaluation
    evaluator = (ClassifierEval(cfg, accelerator, loader, backend_options(cfg, accelerator.device))
                 if cfg.eval.test_shards else None)
    eval_shown: dict = {}  # likewise the classifier's last top-1 / top-5 on eval.test_shards
    window_steps, data_wait, window_start = 0, 0.0, time.perf_counter()
    record: dict = {}
    net.train()
    start_epoch, start_in_epoch = divmod(global_step, steps_per_epoch)
    stop, stopping = StopOnSigterm(), False
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            if global_step >= last_step or stopping:
                break
            step_in_epoch = start_in_epoch if epoch == start_epoch else 0
            loader.set_epoch(epoch, start_step=step_in_epoch)
            batches = iter(loader)
            while global_step < last_step:
                batch, waited = next_batch(batches)
                if batch is None:
                    break
                data_wait += waited
                with record_function("to_device"):
                    batch = to_device(batch, device)
                    index = batch["index"].to(device, non_blocking=True)
                with record_function("augment"):
                    batch = augment(batch, epoch)  # uint8 loader batch -> float model batch, on the device
                    image, patches = batch["image"], batch["patches"]
                    if cfg.run.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)

                if contrastive:
                    losses, log_z = contrastive_losses(cfg, net, bank, image, patches, batch["index"], index,
                                                       global_step, autocast, accelerator, loader, log_z, need_log_z)
                    need_log_z = False
                elif cfg.method in PAIR_METHODS:
                    losses = pair_losses(cfg, net, momentum_keys, image, patches, index, global_step, autocast,
                                         accelerator, loader)
                else:
                    target = covariant_target(cfg, global_step, epoch, index, batch.get("label"))
                    views = image[:, None] if cfg.method == "supervised" else patches  # supervised: the image view
                    with autocast:
                        logits = net(views, target if cfg.method == "jigsaw" else None)
                    losses = classification_loss(logits, target)
                # This rank's share of the global batch (host numbers: no communication); 1 on one process. A
                # corrupt sample left out here counts out of the total; one left out on another rank does not.
                share = len(batch["index"]) / (loader.global_batch_size(step_in_epoch) - loader.batch_skipped)
                with record_function("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(losses["loss"] * (share * accelerator.num_processes))
                with record_function("optimizer"):
                    optimizer.step()
                    scheduler.step()
                if contrastive:
                    with record_function("bank_update"):
                        rows, feats = gather_rows(accelerator, index, losses["f_img"], loader.max_batch_size)
                        bank.update(rows, feats, momentum=cfg.loss.bank_momentum)
                if momentum_keys is not None:  # EMA of the stepped query network, then this step's keys queued
                    after_step(momentum_keys, accelerator.unwrap_model(net), losses)

                global_step += 1
                step_in_epoch += 1
                window_steps += 1
                for key in window:
                    window[key] += losses[key].detach().mean() * share  # summed over ranks: the global mean
                if global_step % cfg.run.log_every == 0 or global_step == last_step:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": global_step, "epoch": epoch}
                    sums = window_sums(accelerator, {**window, "skipped": float(len(loader.skipped))}, device)
                    skipped = int(sums.pop("skipped"))  # corrupt samples left out so far this epoch, all ranks
                    check_finite(sums, global_step - window_steps + 1, global_step, out_dir)
                    record.update({k: v / window_steps for k, v in sums.items()})
                    record["skipped"] = skipped
                    record["lr"] = scheduler.get_last_lr()[0]
                    record["img_per_s"] = window_steps * global_batch / elapsed
                    record["data_wait_frac"] = data_wait / elapsed
                    if run_log is not None:
                        run_log.write(record)
                    postfix = dict(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}",
                                   data_wait=f"{100 * record['data_wait_frac']:.0f}%", skipped=skipped, **knn_shown,
                                   **eval_shown)
                    progress.set_postfix(postfix)
                    window = {k: 0.0 for k in window}
                    window_steps, data_wait, window_start = 0, 0.0, time.perf_counter()
                if cfg.knn.every > 0 and (global_step % cfg.knn.every == 0 or global_step == last_step):
                    knn_start = time.perf_counter()
                    if knn is not None:  # the main process evaluates, the others wait
                        with record_function("knn"):
                            result = knn.evaluate(accelerator.unwrap_model(net).trunk, device)
                        run_log.write({"step": global_step, "epoch": epoch, **result})
                        knn_shown = {"knn": f"{result['knn_top1']:.1f}%"}
                        progress.set_postfix({**postfix, **knn_shown})
                    accelerator.wait_for_everyone()
                    window_start += time.perf_counter() - knn_start  # not counted as training time
                if evaluator is not None and due(global_step, steps_per_epoch, cfg.eval.every_epochs, last_step):
                    eval_start = time.perf_counter()
                    with record_function("eval"):  # every rank scores its share of the test shards
                        result = evaluator.evaluate(accelerator.unwrap_model(net), global_step, epoch)
                    if run_log is not None:
                        run_log.write({"step": global_step, "epoch": epoch, **result})
                    eval_shown = {"top1": f"{result['eval_top1']:.1f}%", "top5": f"{result['eval_top5']:.1f}%"}
                    progress.set_postfix({**postfix, **knn_shown, **eval_shown})
                    window_start += time.perf_counter() - eval_start  # not counted as training time
                progress.update(1)
                if profiler is not None:
                    profiler.step()
                if stop.requested(accelerator, log_step=global_step % cfg.run.log_every == 0):
                    stopping = True
                    break
                if global_step % cfg.run.ckpt_every == 0 and global_step != last_step:
                    check_finite(window_sums(accelerator, window, device), global_step - window_steps + 1,
                                 global_step, out_dir)  # never a checkpoint of NaN weights
                    save(global_step)
    finally:
        stop.restore()
    check_finite(window_sums(accelerator, window, device), global_step - window_steps + 1, global_step, out_dir)
    save(global_step)
    progress.close()
    if run_log is not None:
        run_log.close()
    if stopping:
        accelerator.print(f"stopped on {stop.signal_name or 'SIGTERM'} after step {global_step}: checkpoint "
                          f"{checkpoint.checkpoint_path(out_dir, global_step)} written; continue with --resume")
    else:
        accelerator.print(f"done: step {global_step}, checkpoint {checkpoint.checkpoint_path(out_dir, global_step)}")
    accelerator.end_training()
    return record


def main(argv: Sequence[str] | None = None) -> dict | None:
    args, cfg = config_from_cli(PirlConfig, argv, description=__doc__.splitlines()[0])
    return None if cfg is None else train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
