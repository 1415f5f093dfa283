"""Online linear evaluation, `--mode=online` of train/linear_probe.py: the probe for sets whose features do not fit.

    python train/linear_probe.py --mode=online --checkpoint=runs/pirl_r50/checkpoints/step_001000000.pt \
        --train_shards=shards/train --test_shards=shards/val --online_out_dir=runs/pirl_r50/online_probe
    accelerate launch train/linear_probe.py --mode=online ...   # one process per GPU, the same result
    python train/linear_probe.py --mode=online ... --resume     # from online_out_dir's latest checkpoint

Goyal et al. 2019's ImageNet protocol, which the PIRL paper's linear classification follows: the trunk is frozen in
eval mode (no gradient; its BatchNorm statistics stay as they are: bn = "running"); each probed stage res2..res5 is
average-pooled to about 9,000 dimensions exactly as in the cached probe (linear_probe.pool_grid), normalised by a
BatchNorm without affine parameters and classified by one linear layer. Every head trains from the same trunk pass
of each batch, with SGD on the summed losses (ProbeConfig's online_* values and their sources). Training images are
the pretraining loader's image view (random resized crop and flip), converted and normalised with no colour jitter;
test images are the eval view (shorter side to 256/224 of the view size, centre crop).

Nothing is kept per sample: memory does not grow with the data. The rest is the pretraining loop's (train/pirl.py):
every backend through pipelines.make_loader, the sampler's exactly-once epochs over the ranks, Accelerate (DDP
all-reduces the heads' gradients), checkpoints every online_ckpt_every steps and at the end, --resume from the exact
step, SIGTERM, a progress bar, log.jsonl and TensorBoard. The test shards are scored at the end of every
online_eval_every-th epoch and at the run's last step, each rank on its share (every test image once, whatever the
division), the hit counts summed over the ranks. The result has the cached probe's keys (linear_probe.probe_result).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from pirl_trainer import pipelines
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.class_index import check_same_classes
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.train import checkpoint
from pirl_trainer.train.checkpoint import RunShape, check_resume_data, load_resume_state
from pirl_trainer.train.config import ConfigError, to_dict, to_yaml
from pirl_trainer.train.classifier_eval import topk_correct
from pirl_trainer.train.linear_probe import (ProbeConfig, check_layers, eval_images, eval_loader, load_trunk,
                                             probe_result, report, stage_dims, stage_features)
from pirl_trainer.train.log_window import TimedWindow
from pirl_trainer.train.pirl import next_batch, to_device
from pirl_trainer.train.preemption import StopOnSigterm
from pirl_trainer.train.run_log import RunLog, start_run_folder
from pirl_trainer.train.schedule import scaled_lr, step_lr_factor

GOYAL_EPOCHS = 28  # the schedule online_lr_milestones are quoted in: Goyal et al. 2019's 28 ImageNet epochs
# Area share of It's crop in the training loader: ~20 px square on a 500x375 photo, resized to one pixel, so the
# view nobody trains on costs next to nothing and never holds back the reduced JPEG decoding (geometry.dct_reduction)
IT_SCALE = 0.002
# a resumed run must probe the same trunk the same way
SAME_PROBE = ("checkpoint", "arch", "image_size", "layers", "online_train_view")
TRAIN_VIEWS = ("random_resized", "centre")  # online_train_view: Goyal et al.'s training images, or the eval view


def train_view_recipe(recipe: PirlRecipe) -> PirlRecipe:
    """The training loader's recipe: the image view of PIRL's recipe (Goyal et al.'s random resized crop + flip, also
    for a trunk pretrained on other crops, e.g. MoCo v2's), It shrunk to one 1x1 patch.

    Every backend's pretraining mode cuts the image view Goyal et al. train on (random resized crop + flip) and
    also It; with a one-cell grid of one pixel from a tiny crop, It costs almost nothing, so no loader needs a mode
    of its own. The image view's draws come first (geometry.draw_sample_geometry): they are pretraining's.
    """
    goyal = PirlRecipe()  # torchvision's RandomResizedCrop and flip, whatever crops the trunk was pretrained on
    return dataclasses.replace(recipe, jigsaw_view="jigsaw", grid=1, jigsaw_size=1, patch_size=1,
                               jigsaw_scale_min=IT_SCALE, jigsaw_scale_max=IT_SCALE,
                               image_scale_min=goyal.image_scale_min, image_scale_max=goyal.image_scale_max,
                               ratio_min=goyal.ratio_min, ratio_max=goyal.ratio_max, flip_p=goyal.flip_p,
                               blur_p=0.0).validate()


def train_images(cfg: ProbeConfig, recipe: PirlRecipe, rank: int, world: int):
    """This rank's loader of the heads' training images, shuffled per epoch: online_train_view's random resized
    crops + flips (train_view_recipe), or the eval view (centre crops, what the cached probe fits)."""
    if cfg.online_train_view == "centre":
        loader = eval_loader(cfg.train_shards, recipe, cfg, rank=rank, world_size=world)
        loader.shuffle = True
        return loader
    return eval_loader(cfg.train_shards, train_view_recipe(recipe), cfg, mode="pretrain", rank=rank, world_size=world)


class StageHeads(nn.Module):
    """One linear classifier per probed stage: its pooled feature -> BatchNorm1d (no affine) -> Linear.

    The BatchNorm puts every stage's feature on one scale, so that one learning rate serves res2 and res5 (VISSL's
    eval_mlp heads of Goyal et al. 2019 normalise before the linear layer too); its affine part would be a second
    scale and shift in front of the linear layer's own.
    """

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, num_classes))
                                    for name, d in dims.items()})

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: head(feats[name]) for name, head in self.heads.items()}  # (B, num_classes) each


def check_online_config(cfg: ProbeConfig) -> list[str]:
    """The probed stages in forward order; a ConfigError naming the first bad online value."""
    if not cfg.train_shards or not cfg.test_shards:
        raise ConfigError("train_shards and test_shards are required")
    if cfg.backend not in pipelines.BACKENDS:
        raise ConfigError(f"backend must be one of {sorted(pipelines.BACKENDS)}, got {cfg.backend!r}")
    if cfg.online_train_view not in TRAIN_VIEWS:
        raise ConfigError(f"online_train_view must be one of {TRAIN_VIEWS}, got {cfg.online_train_view!r}")
    if cfg.online_train_view == "centre" and cfg.backend == "dali":
        raise ConfigError("online_train_view=centre shuffles an eval loader, and DALI's eval order is its own: "
                          "use backend=reference or ffcv")
    rules = [
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("online_epochs", cfg.online_epochs >= 1, ">= 1"),
        ("online_lr", cfg.online_lr > 0, "> 0"),
        ("online_reference_batch", cfg.online_reference_batch >= 1, ">= 1"),
        ("online_lr_milestones", all(0 < m <= GOYAL_EPOCHS for m in cfg.online_lr_milestones),
         f"epochs of the {GOYAL_EPOCHS}-epoch schedule, each in [1, {GOYAL_EPOCHS}]"),
        ("online_lr_decay", 0 < cfg.online_lr_decay <= 1, "in (0, 1]"),
        ("online_momentum", 0 <= cfg.online_momentum < 1, "in [0, 1)"),
        ("online_weight_decay", cfg.online_weight_decay >= 0, ">= 0"),
        ("online_eval_every", cfg.online_eval_every >= 1, ">= 1"),
        ("online_log_every", cfg.online_log_every >= 1, ">= 1"),
        ("online_ckpt_every", cfg.online_ckpt_every >= 1, ">= 1"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{name} must be {rule}, got {getattr(cfg, name)!r}")
    return check_layers(cfg.layers)


def milestone_steps(cfg: ProbeConfig, steps_per_epoch: int) -> list[int]:
    """The steps (0-based) from which the rate is multiplied by online_lr_decay once more: online_lr_milestones,
    quoted in epochs of the 28-epoch schedule, scaled to online_epochs."""
    return [round(m * cfg.online_epochs * steps_per_epoch / GOYAL_EPOCHS) for m in cfg.online_lr_milestones]


def build_optimizer(cfg: ProbeConfig, params, steps_per_epoch: int, global_batch: int):
    """(SGD, its scheduler, stepped once a training step): online_lr scaled to the global batch, decayed at the
    milestones, no warm-up (Goyal et al. 2019 have none)."""
    optimizer = torch.optim.SGD(params, lr=scaled_lr(cfg.online_lr, global_batch, cfg.online_reference_batch),
                                momentum=cfg.online_momentum, weight_decay=cfg.online_weight_decay)
    milestones = milestone_steps(cfg, steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: step_lr_factor(s, 0, milestones, cfg.online_lr_decay))


def online_settings(cfg: ProbeConfig, global_batch: int) -> dict:
    """What decides an online probe's numbers besides the trunk and the data (the result's "settings")."""
    return {"mode": "online", "epochs": cfg.online_epochs, "lr": cfg.online_lr, "global_batch": global_batch,
            "reference_batch": cfg.online_reference_batch, "lr_milestones": list(cfg.online_lr_milestones),
            "lr_decay": cfg.online_lr_decay, "momentum": cfg.online_momentum,
            "weight_decay": cfg.online_weight_decay, "train_view": cfg.online_train_view, "seed": cfg.seed,
            "bf16": cfg.online_bf16, "channels_last": cfg.online_channels_last}


def head_losses(heads: nn.Module, feats: dict[str, torch.Tensor], label: torch.Tensor,
                layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) each head's cross-entropy on the batch and (L,) int64 its top-1 hits, on the device (no host read)."""
    logits = heads(feats)
    losses = torch.stack([F.cross_entropy(logits[name], label) for name in layers])
    hits = torch.stack([(logits[name].detach().argmax(1) == label).sum() for name in layers])
    return losses, hits


@torch.no_grad()
def frozen_features(trunk: nn.Module, image: torch.Tensor, layers: list[str], *, bf16: bool = False,
                    channels_last: bool = False) -> dict[str, torch.Tensor]:
    """stage_features of the frozen trunk, run as online_bf16 / online_channels_last ask (the trunk itself is put
    in channels_last once, by online_probe); float32 features either way, for float32 heads."""
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        return stage_features(trunk, image, layers)


@torch.no_grad()
def evaluate(trunk: nn.Module, heads: StageHeads, loader, recipe: PirlRecipe, device: torch.device,
             show: bool = False, *, bf16: bool = False, channels_last: bool = False) -> torch.Tensor:
    """(L, 3) int64, a row per head in its order: [top-1 hits, top-5 hits, images] over the loader's samples (with a
    rank's test loader: that rank's share of the test shards). Leaves the heads in eval mode. bf16, channels_last:
    the trunk's forward (frozen_features)."""
    heads.eval()
    layers = list(heads.heads)
    counts = torch.zeros(len(layers), 3, dtype=torch.int64, device=device)
    loader.set_epoch(0)
    for batch, image in tqdm(eval_images(loader, recipe, device), desc="test", unit="batch", leave=False,
                             total=len(loader), disable=not show):
        label = batch["label"].to(device, non_blocking=True)
        logits = heads(frozen_features(trunk, image, layers, bf16=bf16, channels_last=channels_last))
        counts[:, :2] += torch.stack([topk_correct(logits[name], label) for name in layers])
        counts[:, 2] += len(label)
    return counts


def share_statistics(module: nn.Module, accelerator: Accelerator) -> None:
    """Rank 0's BatchNorm running statistics on every rank. DDP copies them from rank 0 before each training
    forward, which then updates each rank's own: scoring uses the ones rank 0 checkpoints."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def percent(hits: torch.Tensor, total: torch.Tensor | float) -> list[float | None]:
    """100 * hits / total per entry; None where nothing was counted."""
    total = float(total)
    return [100.0 * h / total if total else None for h in hits.tolist()]


class ProbeWindow(TimedWindow):
    """The steps since the last log record: each head's loss x this rank's share of the global batch (summed over
    the ranks when recorded: global means), and the wall time and data wait of those steps; beside them the epoch's
    running training hits per head and its image count (last entry), this rank's. Everything stays on the device
    between records, so a plain step reads nothing back to the host; time spent scoring is left out (paused())."""

    def __init__(self, layers: list[str], accelerator: Accelerator, run_log: RunLog | None, global_batch: int,
                 train_counts: torch.Tensor | None = None):
        self.layers, self.accelerator, self.run_log, self.global_batch = layers, accelerator, run_log, global_batch
        self.train_counts = torch.zeros(len(layers) + 1, dtype=torch.int64, device=accelerator.device)
        if train_counts is not None:  # a resumed run's: the sums over every rank, counted once (main process)
            self.train_counts.copy_(train_counts)
        self.loss = torch.zeros(len(layers), device=accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.loss.zero_()
        self._restart()

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def new_epoch(self) -> None:
        self.train_counts.zero_()

    def add(self, losses: torch.Tensor, hits: torch.Tensor, share: float, images: int) -> None:
        """One step: (L,) each head's loss and top-1 hits on this rank's batch of `images`, and its share."""
        self.steps += 1
        self.loss += losses.detach() * share
        self.train_counts[:-1] += hits
        self.train_counts[-1] += images

    def record(self, step: int, epoch: int, lr: float) -> dict:
        """The window's record (written to the run log on the main process), then a fresh window: one all-reduce
        and one host sync."""
        elapsed = time.perf_counter() - self.start
        sums = self.accelerator.reduce(torch.cat([self.loss.double(), self.train_counts.double()]), "sum").cpu()
        train_top1 = percent(sums[len(self.layers):-1], sums[-1])
        record = {"step": step, "epoch": epoch, "lr": lr, "img_per_s": self.steps * self.global_batch / elapsed,
                  "data_wait_frac": self.data_wait / elapsed,
                  **{f"loss/{name}": v / self.steps for name, v in zip(self.layers, sums.tolist())},
                  **{f"train_top1/{name}": v for name, v in zip(self.layers, train_top1)}}
        if self.run_log is not None:
            self.run_log.write(record)
        self._reset()
        return record

    def global_counts(self) -> torch.Tensor:
        """The epoch's running training counts summed over the ranks (a collective: every rank calls it)."""
        return self.accelerator.reduce(self.train_counts.clone(), "sum")


class ProbeProgress:
    """The progress bar (main process) with the latest window's best training top-1 and throughput, and the latest
    scoring's best test top-1."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self.train: dict = {}
        self.test: dict = {}

    def show_train(self, record: dict) -> None:
        best = max(v for k, v in record.items() if k.startswith("train_top1/"))
        self.train = {"train": f"{best:.1f}%", "img_s": f"{record['img_per_s']:.1f}"}
        self.bar.set_postfix({**self.train, **self.test})

    def show_test(self, record: dict) -> None:
        self.test = {"test": f"{max(v for k, v in record.items() if k.startswith('test_top1/')):.1f}%"}
        self.bar.set_postfix({**self.train, **self.test})

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class ProbeParts:
    """What an online probe trains and its checkpoint holds: the stage heads (not DDP-wrapped), their optimiser and
    learning-rate schedule."""

    heads: StageHeads
    optimizer: torch.optim.Optimizer
    scheduler: Any


def save_probe_state(accelerator: Accelerator, out_dir: Path, step: int, parts: ProbeParts, window: ProbeWindow,
                     shape: RunShape, config: dict) -> None:
    """Every rank calls it (the running training counts are summed over the ranks); the main process writes
    checkpoint_path(out_dir, step)."""
    counts = window.global_counts()
    if accelerator.is_main_process:
        checkpoint.save_atomic({
            "heads": parts.heads.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "train_counts": counts.cpu(), "step": step,
            "epoch": step // shape.steps_per_epoch, "step_in_epoch": step % shape.steps_per_epoch,
            "world_size": shape.world_size, "global_batch": shape.global_batch, "num_samples": shape.num_samples,
            "rng": checkpoint.rng_state(), "config": config,
        }, checkpoint.checkpoint_path(out_dir, step))
    accelerator.wait_for_everyone()


def restore_probe_state(accelerator: Accelerator, resume: str, cfg: ProbeConfig, num_samples: int,
                        parts: ProbeParts) -> tuple[int, torch.Tensor | None]:
    """Loads --resume's checkpoint (after checking it probes the same trunk the same way on the same data) into
    `parts` (before accelerator.prepare) and the global RNGs; returns (its step, the running training counts the
    main process continues from; None on the others)."""
    path, state = load_resume_state(resume, Path(cfg.online_out_dir))
    if "heads" not in state:
        raise ValueError(f"{path} is not an online probe checkpoint (no heads)")
    check_resume_data(accelerator, path, state, cfg.train_shards, num_samples, cfg.batch_size, batch_key="batch_size")
    for key in SAME_PROBE:
        if state["config"].get(key, getattr(cfg, key)) != getattr(cfg, key):  # .get: keys added since
            raise ValueError(f"{path} probed with {key}={state['config'][key]!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}")
    parts.heads.load_state_dict(state["heads"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng_state(state["rng"])
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state["step"], state["train_counts"] if accelerator.is_main_process else None


def score_test_shards(trunk: nn.Module, heads: StageHeads, loader, recipe: PirlRecipe, accelerator: Accelerator,
                      forward_options: dict, run_log: RunLog | None, step: int, epoch: int) -> dict:
    """The test shards' top-1 and top-5 per head over every rank, logged (run_log on the main process). Leaves
    the heads in eval mode."""
    with record_function("evaluate"):
        share_statistics(heads, accelerator)
        counts = accelerator.reduce(evaluate(trunk, heads, loader, recipe, accelerator.device,
                                             accelerator.is_main_process, **forward_options), "sum")
    total, layers = int(counts[0, 2]), list(heads.heads)
    record = {"step": step, "epoch": epoch, "num_test": total,
              **{f"test_top1/{name}": v for name, v in zip(layers, percent(counts[:, 0], total))},
              **{f"test_top5/{name}": v for name, v in zip(layers, percent(counts[:, 1], total))}}
    if run_log is not None:
        run_log.write(record)
    return record


def online_result(cfg: ProbeConfig, arch: str, recipe: PirlRecipe, test: dict, train_counts: torch.Tensor,
                  num_train: int, num_classes: int, dims: dict[str, int], global_batch: int) -> dict:
    """The result (linear_probe.probe_result's keys) from the last scoring's record and the last epoch's running
    training counts summed over the ranks; `dims`: {stage: pooled dimension} of the probed stages, in order."""
    layers = list(dims)
    return probe_result(cfg, "online", arch, recipe.image_size, {name: test[f"test_top1/{name}"] for name in layers},
                        {name: test[f"test_top5/{name}"] for name in layers},
                        dict(zip(layers, percent(train_counts[:-1], train_counts[-1]))),  # the last epoch's running
                        dict.fromkeys(layers, cfg.online_weight_decay), dict.fromkeys(layers), bn="running",
                        num_train=num_train, num_test=test["num_test"], num_classes=num_classes, dims=dims,
                        settings=online_settings(cfg, global_batch))


def online_probe(cfg: ProbeConfig, resume: str | None = None, profiler=None) -> dict:
    """Trains the stage heads for online_epochs (or up to online_max_steps), scoring the test shards on the way;
    returns the result (linear_probe.probe_result's keys), or {} when stopped by SIGTERM before the end.

    `profiler`: an object whose step() is called after every training step, as train/pirl.py's train() takes one
    (tools/profile.py probe times the steps with it).
    """
    layers = check_online_config(cfg)
    accelerator = Accelerator(cpu=cfg.online_cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    out_dir = Path(cfg.online_out_dir)
    trunk, arch, recipe = load_trunk(cfg)  # seeds torch with cfg.seed: the same random trunk on every rank
    trunk = trunk.to(device).requires_grad_(False)
    if cfg.online_channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    forward_options = {"bf16": cfg.online_bf16, "channels_last": cfg.online_channels_last}
    train_loader = train_images(cfg, recipe, rank, world)
    test_loader = eval_loader(cfg.test_shards, recipe, cfg, rank=rank, world_size=world)
    # before any step: a test label must name the class the heads learnt under that number
    check_same_classes("online linear probe", cfg.train_shards, train_loader.classes, cfg.test_shards,
                       test_loader.classes)
    if not train_loader.classes:
        raise ValueError(f"{cfg.train_shards}: the online probe needs the shards' class list (manifest `classes`) "
                         "to size its classifiers")
    num_classes = len(train_loader.classes)
    dims = stage_dims(trunk, layers, recipe.image_size)
    augment = BatchAugment(recipe)  # its eval form: convert and normalise, no colour jitter
    steps_per_epoch = len(train_loader)
    total_steps = cfg.online_epochs * steps_per_epoch
    last_step = total_steps if cfg.online_max_steps < 0 else min(total_steps, cfg.online_max_steps)
    global_batch = cfg.batch_size * world
    shape = RunShape(steps_per_epoch, world, global_batch, train_loader.num_samples, train_loader.num_samples)
    heads = StageHeads(dims, num_classes).to(device)
    parts = ProbeParts(heads, *build_optimizer(cfg, heads.parameters(), steps_per_epoch, global_batch))
    global_step, train_counts = 0, None
    if resume is not None:
        global_step, train_counts = restore_probe_state(accelerator, resume, cfg, train_loader.num_samples, parts)
    # heads: DDP-wrapped on several processes, for the training step; parts.heads: the module, scored and saved
    heads, parts.optimizer = accelerator.prepare(parts.heads, parts.optimizer)
    optimizer, scheduler = parts.optimizer, parts.scheduler
    run_log = start_run_folder(out_dir, to_yaml(cfg), cfg.online_tensorboard, main_process)
    window = ProbeWindow(layers, accelerator, run_log, global_batch, train_counts)
    score = functools.partial(score_test_shards, trunk, parts.heads, test_loader, recipe, accelerator,
                              forward_options, run_log)
    progress = ProbeProgress(last_step, global_step, main_process)
    last_test: dict = {"step": -1}  # the latest scoring's record
    start_epoch, start_in_epoch = divmod(global_step, steps_per_epoch)
    heads.train()
    stop, stopping = StopOnSigterm(), False
    try:
        for epoch in range(start_epoch, cfg.online_epochs):
            if global_step >= last_step or stopping:
                break
            step_in_epoch = start_in_epoch if epoch == start_epoch else 0
            if step_in_epoch == 0:
                window.new_epoch()
            train_loader.set_epoch(epoch, start_step=step_in_epoch)
            batches = iter(train_loader)
            while global_step < last_step:
                batch, waited = next_batch(batches)
                window.waited(waited)  # the epoch's end included: the loader's workers winding down
                if batch is None:
                    break
                with record_function("to_device"):
                    batch = to_device(batch, device)
                    label = batch["label"]
                with record_function("augment"):
                    image = augment.eval(batch)["image"]
                with record_function("trunk"):
                    feats = frozen_features(trunk, image, layers, **forward_options)  # {stage: (B, ~9k)}
                # This rank's share of the global batch (pirl.py): DDP's gradient average is the global mean's
                share = len(label) / (train_loader.global_batch_size(step_in_epoch) - train_loader.batch_skipped)
                with record_function("heads"):
                    heads.train(len(label) > 1)  # one image has no batch statistics: its BatchNorm uses the running
                    losses, hits = head_losses(heads, feats, label, layers)
                with record_function("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(losses.sum() * (share * world))
                lr = scheduler.get_last_lr()[0]  # the rate this step trains with
                with record_function("optimizer"):
                    optimizer.step()
                    scheduler.step()
                global_step += 1
                step_in_epoch += 1
                window.add(losses, hits, share, len(label))
                if global_step % cfg.online_log_every == 0 or global_step == last_step:
                    progress.show_train(window.record(global_step, epoch, lr))
                if step_in_epoch == steps_per_epoch and (epoch + 1) % cfg.online_eval_every == 0:
                    with window.paused():  # not counted as training time
                        last_test = score(global_step, epoch)
                        heads.train()
                    progress.show_test(last_test)
                progress.update()
                if profiler is not None:
                    profiler.step()
                if stop.requested(accelerator, log_step=global_step % cfg.online_log_every == 0):
                    stopping = True
                    break
                if global_step % cfg.online_ckpt_every == 0 and global_step != last_step:
                    save_probe_state(accelerator, out_dir, global_step, parts, window, shape, to_dict(cfg))
    finally:
        stop.restore()
    save_probe_state(accelerator, out_dir, global_step, parts, window, shape, to_dict(cfg))
    progress.close()
    result: dict = {}
    if stopping:
        accelerator.print(stop.stopped(global_step, checkpoint.checkpoint_path(out_dir, global_step)))
    else:
        if last_test["step"] != global_step:
            last_test = score(global_step, max(0, global_step - 1) // steps_per_epoch)
        result = online_result(cfg, arch, recipe, last_test, window.global_counts().cpu(), train_loader.num_samples,
                               num_classes, dims, global_batch)
        if main_process:
            report(result, cfg.output or out_dir / "probe.json")
    if run_log is not None:
        run_log.close()
    accelerator.end_training()
    return result
