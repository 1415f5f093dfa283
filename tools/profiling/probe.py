"""The online linear evaluation's training throughput next to the pretraining step's, measured in one run.

Both sides run their real loops for warm-up + timed steps, one after the other in this process: train/pirl.py's
train() on the training config, then train/online_probe.py's online_probe() (the frozen trunk's forward of the
image view, the stage heads' forward, backward and SGD step, with its loader) on a ProbeConfig built from the
same arch, image size, batch size, loader workers, backend, decode device, seed and training shards. Each loop
calls a WallClock after every step; the timed steps are the same count of the same epoch positions on both sides,
so both read the same number of images and the ratio of the rates is the inverse ratio of the wall times.

The trunk's forward follows run.bf16 and run.channels_last (the probe's online_bf16, online_channels_last). What
the online probe has no option for (the trunk's weights: it probes a random trunk of the same arch, which costs the
same; the image view's crop and decoding fields other than the size; DALI's and FFCV's options) it runs at its
defaults: probe_differences lists the training config's departures from them.
"""

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.sampler import rank_sample_count, steps_per_epoch
from pirl_trainer.pipelines.shard_index import ShardIndexError, read_manifest
from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import table
from pirl_trainer.train.config import ConfigError, DataConfig, PirlConfig, load_config
from pirl_trainer.train.linear_probe import ProbeConfig

# The image view's fields the online probe's loader cuts with PirlRecipe's defaults (it takes only image_size)
IMAGE_VIEW_FIELDS = ("image_scale_min", "image_scale_max", "ratio_min", "ratio_max", "flip_p", "reduced_decoding")
LOADER_FIELDS = ("dali", "ffcv_os_cache")  # backend options ProbeConfig has no field for


class WallClock:
    """What a training loop calls step() on after every step (the `profiler` of train() and online_probe()): the
    wall time of the `steps` steps after the first `warmup`. On CUDA the device is synchronised at those two ends
    only, so inside the window the host runs ahead of the device as it does in training."""

    def __init__(self, device: torch.device, *, warmup: int, steps: int):
        self.device = device
        self.first, self.last = warmup, warmup + steps  # counts of ended steps that bound the timed ones
        self.ended = 0
        self.start: float | None = None
        self.end: float | None = None
        self._mark()  # warmup == 0: the window starts here, set-up included

    def step(self) -> None:
        self.ended += 1
        self._mark()

    def _mark(self) -> None:
        if self.ended not in (self.first, self.last):
            return
        machine.synchronize(self.device)
        if self.ended == self.first:
            self.start = time.perf_counter()
        else:
            self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        """The timed steps' wall time; a UsageError if the loop ended before the last of them."""
        if self.start is None or self.end is None:
            raise UsageError(f"the run ended after {self.ended} of its {self.last} steps: its schedule is shorter "
                             "than --warmup + --steps")
        return self.end - self.start


def images_in_steps(num_samples: int, batch_size: int, first: int, last: int) -> int:
    """Images one process reads in global steps first..last-1 of a run over num_samples samples: batch_size a step,
    the rest of the epoch at an epoch's last step (pipelines/sampler.py)."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    last_batch = rank_sample_count(num_samples, batch_size, 1, 0) - (per_epoch - 1) * batch_size
    return sum(last_batch if s % per_epoch == per_epoch - 1 else batch_size for s in range(first, last))


def probe_differences(cfg: PirlConfig) -> list[str]:
    """The training config's settings that the online probe has no option for and runs at their defaults
    instead, as "key=training value (online probe: value)"; empty when the two loops run alike."""
    out = []
    recipe, plain_recipe = cfg.data.recipe, PirlRecipe()
    for name in IMAGE_VIEW_FIELDS:
        if getattr(recipe, name) != getattr(plain_recipe, name):
            out.append(f"data.recipe.{name}={getattr(recipe, name)} (online probe: {getattr(plain_recipe, name)})")
    plain_data = DataConfig(shards=cfg.data.shards)
    for name in LOADER_FIELDS:
        if getattr(cfg.data, name) != getattr(plain_data, name):
            out.append(f"data.{name}={getattr(cfg.data, name)} (online probe: {getattr(plain_data, name)})")
    return out


def probe_config(cfg: PirlConfig, test_shards: str, out_dir: str, max_steps: int) -> ProbeConfig:
    """The online probe of the training config's trunk, data and loader, stopped after max_steps, with nothing
    inside its steps but training: no scoring before the schedule's end, no checkpoint before the last step, and
    its logs (a host sync) as often as the pretraining's."""
    plain = ProbeConfig()
    return dataclasses.replace(
        plain, mode="online", train_shards=cfg.data.shards, test_shards=test_shards, arch=cfg.model.arch,
        image_size=cfg.data.recipe.image_size, backend=cfg.data.backend, decode_device=cfg.data.decode_device,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.run.seed, online_out_dir=out_dir,
        online_max_steps=max_steps, online_eval_every=plain.online_epochs, online_log_every=cfg.run.log_every,
        online_ckpt_every=max(plain.online_ckpt_every, max_steps), online_tensorboard=False, online_cpu=cfg.run.cpu,
        online_bf16=cfg.run.bf16, online_channels_last=cfg.run.channels_last)


def rates(clock: WallClock, images: int, steps: int) -> dict:
    seconds = clock.seconds
    return {"seconds": seconds, "step_ms": 1000 * seconds / steps, "images": images, "img_per_s": images / seconds}


def profile_probe(config: str | None, overrides: list[str], test_shards: str, *, steps: int, warmup: int) -> dict:
    """Times `steps` steps after `warmup` of pretraining (the training config) and of the online probe built from
    it (probe_config), in that order; returns both rates, their ratio, the settings and the device."""
    # imported here: only this subcommand pays for accelerate
    from pirl_trainer.train.online_probe import online_probe
    from pirl_trainer.train.pirl import train

    try:
        cfg = load_config(PirlConfig, config, overrides)
    except ConfigError as err:
        raise UsageError(f"config: {err}") from None
    if cfg.data.subset or cfg.data.subset_fraction:
        raise UsageError("config: data.subset / data.subset_fraction: the online probe trains on whole shards, "
                         "so the two would read different epochs; leave them unset")
    try:
        num_samples = read_manifest(cfg.data.shards)["num_samples"]
        read_manifest(test_shards)  # before the pretraining run: a bad folder fails now, not minutes later
    except ShardIndexError as err:
        raise UsageError(str(err)) from None
    total = warmup + steps
    cfg.run.max_steps = total
    cfg.run.tensorboard = False
    cfg.run.ckpt_every = max(cfg.run.ckpt_every, total)  # a checkpoint between two timed steps would be step time
    cfg.knn.every, cfg.eval.test_shards = 0, ""  # no evaluation inside the timed steps
    device = torch.device("cpu") if cfg.run.cpu else machine.default_device()
    with tempfile.TemporaryDirectory(prefix="pirl-profile-probe-") as tmp:
        if not any(o.startswith("--run.out_dir") for o in overrides):
            cfg.run.out_dir = str(Path(tmp) / "pretrain")
        probe_cfg = probe_config(cfg, test_shards, str(Path(tmp) / "online"), total)
        pretrain_clock = WallClock(device, warmup=warmup, steps=steps)
        try:
            train(cfg, profiler=pretrain_clock)
        except ConfigError as err:  # a value only train() checks, e.g. loss.kind
            raise UsageError(f"config: {err}") from None
        online_clock = WallClock(device, warmup=warmup, steps=steps)
        try:
            online_probe(probe_cfg, profiler=online_clock)
        except ConfigError as err:
            raise UsageError(f"online probe: {err}") from None
    images = images_in_steps(num_samples, cfg.data.batch_size, warmup, total)
    pretrain, online = rates(pretrain_clock, images, steps), rates(online_clock, images, steps)
    return {
        "config": config, "overrides": list(overrides), "test_shards": str(test_shards),
        "arch": cfg.model.arch, "image_size": cfg.data.recipe.image_size, "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers, "backend": cfg.data.backend, "layers": list(probe_cfg.layers),
        "warmup": warmup, "steps": steps, "pretrain": pretrain, "online": online,
        "online_over_pretrain": online["img_per_s"] / pretrain["img_per_s"],
        "not_in_probe": probe_differences(cfg), "device": machine.describe(device),
    }


def report(result: dict) -> str:
    rows = [[name, result[name]["seconds"], result[name]["step_ms"], result[name]["img_per_s"]]
            for name in ("pretrain", "online")]
    lines = [
        f"{result['steps']} timed steps of batch {result['batch_size']} after {result['warmup']} warm-up: "
        f"{result['arch']} at {result['image_size']} px, {result['backend']} backend, {result['num_workers']} "
        f"workers, on {result['device']}",
        table(["run", "s", "ms/step", "img/s"], rows),
        f"online evaluation ({', '.join(result['layers'])} heads): {result['online']['img_per_s']:.1f} img/s, "
        f"{result['online_over_pretrain']:.2f}x the pretraining step's",
    ]
    if result["not_in_probe"]:
        lines.append("the online probe runs these at its defaults: " + "; ".join(result["not_in_probe"]))
    return "\n".join(lines)
