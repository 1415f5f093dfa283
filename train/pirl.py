"""PIRL pretraining: `accelerate launch train/pirl.py --config train/configs/NAME.yaml [--section.key=value ...]`.

One loop, top to bottom: set-up, then for each step: data, forward, negatives from the memory bank, loss,
backward, optimiser step, bank update. Host syncs (`.item()`) happen on log steps only. The baselines (`method`:
npid, jigsaw, rotation, supervised, simclr, moco; train/methods.py) run through the same loop; the classification
ones skip the bank, simclr and moco (train/pair_methods.py) have their own negatives.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.profiler import record_function
from tqdm import tqdm

from pirl_trainer import pipelines
from pirl_trainer.model.losses import negative_similarities, pirl_loss
from pirl_trainer.model.memory_bank import MemoryBank
from pirl_trainer.model.sharded_bank import ShardedMemoryBank
from pirl_trainer.model.sync_batchnorm import convert_sync_batchnorm
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.device_decode import DECODE_DEVICES
from pirl_trainer.common.rng import PURPOSE_HEADS, counter_uniform, derive_seed
from pirl_trainer.pipelines.shard_index import data_files, verify_checksums
from pirl_trainer.pipelines.subset import SubsetError, resolve_subset
from pirl_trainer.train import checkpoint
from pirl_trainer.train.classifier_eval import ClassifierEval, due
from pirl_trainer.train.config import ConfigError, PirlConfig, config_from_cli, to_dict, to_yaml
from pirl_trainer.train.knn_monitor import KnnMonitor
from pirl_trainer.train.log_window import LogWindow, NonFiniteLoss, ProgressLine  # noqa: F401 (raised by train())
from pirl_trainer.train.methods import (CONTRASTIVE, LOG_TERMS, build_net, covariant_losses, init_trunk,
                                       unused_parameters)
from pirl_trainer.train.optimizers import build_optimizer
from pirl_trainer.train.pair_methods import PAIR_METHODS, after_step, build_momentum_keys, pair_losses
from pirl_trainer.train.preemption import StopOnSigterm
from pirl_trainer.train.ranks import gather_rows, global_index, global_log_z
from pirl_trainer.train.run_log import RunLog, start_run_folder
from pirl_trainer.train.schedule import lr_factor, scaled_lr, step_lr_factor
from pirl_trainer.train.validation import BANK_DTYPES, check_config, check_negatives


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


def model_batch(batch: dict, augment: BatchAugment, epoch: int, device: torch.device,
                channels_last: bool) -> tuple[dict, torch.Tensor]:
    """The loader batch on the training device through the batched stage (the to_device and augment phases): the
    float model batch, its image view in channels_last where run.channels_last, and its global indexes on the
    device (`index` of the batch stays on the host)."""
    with record_function("to_device"):
        batch = to_device(batch, device)
        index = batch["index"].to(device, non_blocking=True)
    with record_function("augment"):
        batch = augment(batch, epoch)  # uint8 loader batch -> float model batch, on the device
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch, index


def step_losses(cfg: PirlConfig, parts: checkpoint.TrainingParts, net, batch: dict, index: torch.Tensor, step: int,
                epoch: int, autocast, accelerator: Accelerator, loader, log_z: torch.Tensor,
                need_log_z: bool) -> tuple[dict, torch.Tensor]:
    """The configured method's forward pass and loss on the model batch: (losses with `loss` and the method's
    LOG_TERMS, log_z). net: the (DDP-wrapped) network the step trains; log_z: binary NCE's constant, estimated
    here where need_log_z, else passed through."""
    image, patches = batch["image"], batch["patches"]
    if cfg.method in CONTRASTIVE:
        return contrastive_losses(cfg, net, parts.bank, image, patches, batch["index"], index, step, autocast,
                                  accelerator, loader, log_z, need_log_z)
    if cfg.method in PAIR_METHODS:
        return pair_losses(cfg, net, parts.momentum_keys, image, patches, index, step, autocast, accelerator,
                           loader), log_z
    return covariant_losses(cfg, net, image, patches, index, batch.get("label"), step, epoch, autocast), log_z


def update_bank(cfg: PirlConfig, bank, accelerator: Accelerator, index: torch.Tensor, f_img: torch.Tensor,
                max_batch: int) -> None:
    """The memory bank's rows of the global batch moved towards its new image embeddings (eq. 5's m_I)."""
    with record_function("bank_update"):
        rows, feats = gather_rows(accelerator, index, f_img, max_batch)
        bank.update(rows, feats, momentum=cfg.loss.bank_momentum)


def build_scheduler(cfg: PirlConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """optim.*'s learning-rate factor per step: linear warm-up, then cosine to final_lr, or the drops of lr_steps."""
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    final_ratio = cfg.optim.final_lr / cfg.optim.lr
    drops = [round(epoch * steps_per_epoch) for epoch in cfg.optim.lr_steps]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: step_lr_factor(s, warmup_steps, drops) if drops else
        lr_factor(s, total_steps, warmup_steps, final_ratio)
    )


def build_trained_net(cfg: PirlConfig, accelerator: Accelerator, loader, resume: str | None) -> torch.nn.Module:
    """The method's network (methods.build_net), its trunk from model.init_checkpoint in a fresh run, with
    synchronised BatchNorm (model.sync_bn) on several processes, in channels_last where run.channels_last."""
    net = build_net(cfg, loader.classes if loader.labelled else None)
    if cfg.model.init_checkpoint and resume is None:  # a resumed run restores its own trunk
        init_trunk(net, cfg.model.init_checkpoint, cfg.model.arch)
        accelerator.print(f"trunk initialised from {cfg.model.init_checkpoint}")
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        net = convert_sync_batchnorm(net, accelerator.device)
    if cfg.run.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def resume_run(cfg: PirlConfig, accelerator: Accelerator, resume: str, out_dir: Path, loader,
               parts: checkpoint.TrainingParts) -> tuple[int, torch.Tensor]:
    """--resume: its checkpoint checked against this run's data, batch and method, then loaded into `parts`;
    returns (its global step, its log_z)."""
    path, state = checkpoint.load_resume_state(resume, out_dir)
    checkpoint.check_resume_data(accelerator, path, state, cfg.data.shards, loader.num_samples, cfg.data.batch_size)
    checkpoint.check_resume_run(path, state, cfg.method, loader.epoch_samples)
    step, log_z = checkpoint.restore_training_state(state, parts)
    accelerator.print(f"resumed from {path} at step {step}")
    return step, log_z


def knn_evaluation(knn: KnnMonitor | None, accelerator: Accelerator, net, step: int, epoch: int,
                   run_log: RunLog | None, progress: ProgressLine) -> None:
    """knn.*: the main process scores the trunk (logged, and kept in the progress line); the others wait."""
    if knn is not None:
        with record_function("knn"):
            result = knn.evaluate(accelerator.unwrap_model(net).trunk, accelerator.device)
        run_log.write({"step": step, "epoch": epoch, **result})
        progress.show_knn(result)
    accelerator.wait_for_everyone()


def classifier_evaluation(evaluator: ClassifierEval, accelerator: Accelerator, net, step: int, epoch: int,
                          run_log: RunLog | None, progress: ProgressLine) -> None:
    """eval.*: every rank scores its share of the test shards; the main process logs the top-1 / top-5."""
    with record_function("eval"):
        result = evaluator.evaluate(accelerator.unwrap_model(net), step, epoch)
    if run_log is not None:
        run_log.write({"step": step, "epoch": epoch, **result})
    progress.show_eval(result)


def train(cfg: PirlConfig, resume: str | None = None, profiler=None) -> dict:
    """Runs the configured schedule (or up to run.max_steps); returns the final step's logged record.

    `profiler`: a torch.profiler.profile whose step() is called after every training step (tools/profile.py).
    """
    check_config(cfg)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=unused_parameters(cfg))
    accelerator = Accelerator(cpu=cfg.run.cpu, kwargs_handlers=[ddp])
    device = accelerator.device
    out_dir = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)  # same on every rank: identical initial weights and bank

    if cfg.data.verify_sha256:
        verify_data(cfg.data.shards, accelerator)
    loader = build_loader(cfg, accelerator)
    steps_per_epoch = len(loader)
    global_batch = cfg.data.batch_size * accelerator.num_processes
    shape = checkpoint.RunShape(steps_per_epoch, accelerator.num_processes, global_batch, loader.num_samples,
                                loader.epoch_samples)

    augment = build_augment(cfg)
    contrastive = cfg.method in CONTRASTIVE
    net = build_trained_net(cfg, accelerator, loader, resume)
    bank = build_bank(cfg, loader.num_samples, device) if contrastive else None
    # MoCo's key encoder and queue: replicated on every rank, outside the DDP-wrapped module (model/moco.py)
    momentum_keys = build_momentum_keys(cfg, net, accelerator, loader) if cfg.method == "moco" else None
    if contrastive:  # before the bank's initialisation and the first step, not at the first draw
        check_negatives(cfg, loader.num_samples)
    optimizer = build_optimizer(cfg.optim, net, scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_batch))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    parts = checkpoint.TrainingParts(net, optimizer, scheduler, bank, momentum_keys)
    log_z = torch.tensor(float("nan"))  # Wu et al.'s constant, estimated on the first step (binary NCE only)

    global_step = 0
    if resume is not None:
        global_step, log_z = resume_run(cfg, accelerator, resume, out_dir, loader, parts)
    elif contrastive and cfg.loss.bank_init == "features":
        init_bank_from_features(net.to(device), bank, cfg, accelerator)

    net, optimizer = accelerator.prepare(net, optimizer)  # parts keeps the unwrapped network: what is saved
    log_z = log_z.to(device)
    need_log_z = cfg.loss.kind == "nce" and bool(torch.isnan(log_z))
    run_log = start_run_folder(out_dir, to_yaml(cfg), cfg.run.tensorboard, accelerator.is_main_process)

    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = total_steps if cfg.run.max_steps < 0 else min(total_steps, cfg.run.max_steps)
    progress = ProgressLine(last_step, global_step, accelerator.is_main_process)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.bf16)
    knn = build_knn_monitor(cfg) if cfg.knn.every > 0 and accelerator.is_main_process else None
    evaluator = (ClassifierEval(cfg, accelerator, loader, backend_options(cfg, accelerator.device))
                 if cfg.eval.test_shards else None)
    # Means over the log window; pos_/neg_ are the cosine similarities to m_I and to the bank negatives m_I'.
    window = LogWindow(LOG_TERMS[cfg.method], accelerator, out_dir, run_log, log_every=cfg.run.log_every,
                       last_step=last_step, global_batch=global_batch)
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
                batch, index = model_batch(batch, augment, epoch, device, cfg.run.channels_last)
                losses, log_z = step_losses(cfg, parts, net, batch, index, global_step, epoch, autocast, accelerator,
                                            loader, log_z, need_log_z)
                need_log_z = False
                # This rank's share of the global batch (host numbers: no communication); 1 on one process. A
                # corrupt sample left out here counts out of the total; one left out on another rank does not.
                share = len(batch["index"]) / (loader.global_batch_size(step_in_epoch) - loader.batch_skipped)
                with record_function("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(losses["loss"] * (share * accelerator.num_processes))
                with record_function("optimizer"):
                    optimizer.step()
                    scheduler.step()
                if bank is not None:
                    update_bank(cfg, bank, accelerator, index, losses["f_img"], loader.max_batch_size)
                if momentum_keys is not None:  # EMA of the stepped query network, then this step's keys queued
                    after_step(momentum_keys, accelerator.unwrap_model(net), losses)
                global_step += 1
                step_in_epoch += 1
                window.add(losses, share, waited)
                if window.due(global_step):
                    progress.show(window.record(global_step, epoch, len(loader.skipped), scheduler.get_last_lr()[0]))
                if cfg.knn.every > 0 and (global_step % cfg.knn.every == 0 or global_step == last_step):
                    with window.paused():  # not counted as training time
                        knn_evaluation(knn, accelerator, net, global_step, epoch, run_log, progress)
                if evaluator is not None and due(global_step, steps_per_epoch, cfg.eval.every_epochs, last_step):
                    with window.paused():
                        classifier_evaluation(evaluator, accelerator, net, global_step, epoch, run_log, progress)
                progress.update()
                if profiler is not None:
                    profiler.step()
                if stop.requested(accelerator, log_step=global_step % cfg.run.log_every == 0):
                    stopping = True
                    break
                if global_step % cfg.run.ckpt_every == 0 and global_step != last_step:
                    window.check(global_step)  # never a checkpoint of NaN weights
                    checkpoint.save_training_state(accelerator, out_dir, global_step, parts, log_z, shape, to_dict(cfg))
    finally:
        stop.restore()
    window.check(global_step)
    checkpoint.save_training_state(accelerator, out_dir, global_step, parts, log_z, shape, to_dict(cfg))
    progress.close()
    if run_log is not None:
        run_log.close()
    if stopping:
        accelerator.print(stop.stopped(global_step, checkpoint.checkpoint_path(out_dir, global_step)))
    else:
        accelerator.print(f"done: step {global_step}, checkpoint {checkpoint.checkpoint_path(out_dir, global_step)}")
    accelerator.end_training()
    return window.last


def main(argv: Sequence[str] | None = None) -> dict | None:
    args, cfg = config_from_cli(PirlConfig, argv, description=__doc__.splitlines()[0])
    return None if cfg is None else train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
