"""A short training run under torch.profiler, its step split into the phases train/pirl.py and the model mark."""

import tempfile

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import table
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config

# The record_function names of one step, none nested inside another (bank_draw sits inside negatives_draw,
# bank_update_rows inside bank_update: they are not listed, so nothing is counted twice).
PHASES = ("data_wait", "to_device", "augment", "trunk_image", "trunk_patches", "heads", "negatives_draw",
          "bank_gather", "loss", "backward", "optimizer", "bank_update")


def profile_step(config: str | None, overrides: list[str], *, steps: int, warmup: int,
                 trace: str | None = None) -> dict:
    from pirl_trainer.train.pirl import train  # imports accelerate: only this subcommand pays for it

    try:
        cfg = load_config(PirlConfig, config, overrides)
    except ConfigError as err:
        raise UsageError(f"config: {err}") from None
    cfg.run.max_steps = warmup + steps
    cfg.run.tensorboard = False
    # A checkpoint written between two profiled steps would count as step time (train() still writes its last).
    cfg.run.ckpt_every = max(cfg.run.ckpt_every, cfg.run.max_steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory(prefix="pirl-profile-") as tmp:
        if not any(o.startswith("--run.out_dir") for o in overrides):
            cfg.run.out_dir = tmp
        # The first steps also pay for set-up (workers, bank initialisation, allocator): warm-up, not recorded.
        with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                     record_shapes=False) as prof:
            try:
                train(cfg, profiler=prof)
            except ConfigError as err:  # a value only train() checks, e.g. loss.kind
                raise UsageError(f"config: {err}") from None
    if trace:
        prof.export_chrome_trace(trace)
    result = summarise(prof.key_averages(), batch_size=cfg.data.batch_size)
    if result["steps"] < steps:
        print(f"warning: the schedule ended after {result['steps']} of the {steps} profiled steps")
    device = torch.device("cpu") if cfg.run.cpu else machine.default_device()
    return {"config": config, "overrides": list(overrides), **result, "device": machine.describe(device)}


def summarise(averages, *, batch_size: int) -> dict:
    """Per-step ms of each phase and of the whole step, from prof.key_averages() of the active steps."""
    by_name = {e.key: e for e in averages}
    # One ProfilerStep#k range per step, from one prof.step() to the next: the step's wall time. Recent torch
    # versions merge them into one "ProfilerStep*" entry; older ones keep one entry per k.
    step_events = [e for e in averages if e.key.startswith("ProfilerStep")]
    measured = sum(e.count for e in step_events)
    if measured == 0:
        raise UsageError("no step was profiled: the training schedule ended during the warm-up steps")
    step_ms = sum(e.cpu_time_total for e in step_events) / 1000 / measured
    phases = {}
    for name in PHASES:
        e = by_name.get(name)
        cpu_ms = e.cpu_time_total / 1000 / measured if e else 0.0
        device_ms = None
        if e is not None and torch.cuda.is_available():
            device_us = getattr(e, "device_time_total", None)
            device_ms = (e.cuda_time_total if device_us is None else device_us) / 1000 / measured
        phases[name] = {"cpu_ms": cpu_ms, "device_ms": device_ms}
    # This tool runs train() in one process; under accelerate launch each rank would report its own share.
    num_processes = 1
    return {
        "steps": measured, "batch_size": batch_size, "step_ms": step_ms,
        "img_per_s": batch_size * num_processes / (step_ms / 1000),
        "data_stall_share": phases["data_wait"]["cpu_ms"] / step_ms,
        "phases": phases, "other_ms": step_ms - sum(p["cpu_ms"] for p in phases.values()),
    }


def report(result: dict) -> str:
    step_ms = result["step_ms"]
    rows = [[name, p["cpu_ms"], p["device_ms"], 100 * p["cpu_ms"] / step_ms] for name, p in result["phases"].items()]
    rows.append(["other", result["other_ms"], None, 100 * result["other_ms"] / step_ms])
    rows.append(["step", step_ms, None, 100.0])
    return "\n".join([
        f"{result['steps']} steps of batch {result['batch_size']} on {result['device']}",
        table(["phase", "ms/step", "device ms/step", "% of step"], rows),
        f"{result['img_per_s']:.1f} img/s; data stall {100 * result['data_stall_share']:.1f}% of the step",
    ])
