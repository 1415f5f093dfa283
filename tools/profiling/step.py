"""A short training run under torch.profiler, its step split into the phases train/pirl.py and the model mark.

On the CPU every phase's time is the host clock of its record_function range: the work runs where it is launched.
On CUDA the host only queues kernels, and a host clock charges them to whichever phase happens to wait for them
(a later .item(), a full queue). So on CUDA the device is synchronised at the ends of the measured steps and
nowhere else: a step's time is the wall time between two synchronisations, and each phase reports the device time
of the kernels it launched (device_ms) next to its host time (cpu_ms, the time spent launching them).
"""

import bisect
import tempfile
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import table
from pirl_trainer.train.config import ConfigError, PirlConfig, load_config

# The record_function names of one step, none nested inside another (bank_draw sits inside negatives_draw,
# bank_update_rows inside bank_update: they are not listed, so nothing is counted twice).
PHASES = ("data_wait", "to_device", "augment", "trunk_image", "trunk_patches", "heads", "negatives_draw",
          "bank_gather", "loss", "backward", "optimizer", "bank_update")
STEP = "ProfilerStep"  # the profiler's own range per step, from one prof.step() to the next


class StepSynchronizer:
    """What train() calls step() on when the device is CUDA: waits for the device, then ends the profiler's step,
    at the boundaries of the measured steps only (the end of the step before the first measured one, and the end
    of each measured one). A measured step's range then holds its own kernels, and no synchronisation falls inside
    a step, where it would stall the host's run-ahead and change what is measured."""

    def __init__(self, prof, device: torch.device, *, warmup: int, steps: int):
        self.prof, self.device = prof, device
        self.first, self.last = warmup, warmup + steps  # counts of ended steps that bound the measured ones
        self.ended = 0
        self._synchronize_at_boundary()  # warmup == 0: the first measured step starts here

    def step(self) -> None:
        self.ended += 1
        self._synchronize_at_boundary()
        self.prof.step()

    def _synchronize_at_boundary(self) -> None:
        if self.first <= self.ended <= self.last:
            machine.synchronize(self.device)


def profile_step(config: str | list[str] | None, overrides: list[str], *, steps: int, warmup: int,
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
    device = torch.device("cpu") if cfg.run.cpu else machine.default_device()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tempfile.TemporaryDirectory(prefix="pirl-profile-") as tmp:
        if not any(o.startswith("--run.out_dir") for o in overrides):
            cfg.run.out_dir = tmp
        # The first steps also pay for set-up (workers, bank initialisation, allocator): warm-up, not recorded.
        with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                     record_shapes=False) as prof:
            stepper = StepSynchronizer(prof, device, warmup=warmup, steps=steps) if cuda else prof
            try:
                train(cfg, profiler=stepper)
            except ConfigError as err:  # a value only train() checks, e.g. loss.kind
                raise UsageError(f"config: {err}") from None
    if trace:
        prof.export_chrome_trace(trace)
    result = summarise(prof.key_averages(), batch_size=cfg.data.batch_size,
                       kernel_us=kernel_us_by_phase(prof.events()) if cuda else None)
    if result["steps"] < steps:
        print(f"warning: the schedule ended after {result['steps']} of the {steps} profiled steps")
    return {"config": config, "overrides": list(overrides), **result, "device": machine.describe(device)}


def compare_methods(config: str | None, methods: list[str], overrides: list[str], *, steps: int,
                    warmup: int) -> dict:
    """profile_step for each method in turn on the same recipe (`config`, then the method's YAML, then
    `overrides`): every method's result and its img/s relative to the first's, measured in one run."""
    from pirl_trainer.tools.experiment import method_config

    try:
        configs = {m: [*([config] if config else []), str(method_config(m))] for m in methods}
    except ValueError as err:
        raise UsageError(f"--methods: {err}") from None
    runs = {}
    for method, files in configs.items():
        print(f"== {method}", flush=True)
        runs[method] = profile_step(files, overrides, steps=steps, warmup=warmup)
    first = runs[methods[0]]["img_per_s"]
    return {"config": config, "overrides": list(overrides), "methods": runs,
            "relative": {m: r["img_per_s"] / first for m, r in runs.items()}, "device": runs[methods[0]]["device"]}


def methods_report(result: dict) -> str:
    runs, first = result["methods"], next(iter(result["methods"]))
    rows = [[m, r["img_per_s"], r["step_ms"], 100 * r["data_stall_share"], result["relative"][m]]
            for m, r in runs.items()]
    return "\n".join([f"{runs[first]['steps']} steps of batch {runs[first]['batch_size']} per method on "
                      f"{result['device']}",
                      table(["method", "img/s", "ms/step", "data stall %", f"x {first}"], rows)])


def kernel_us_by_phase(events) -> dict[str, float]:
    """Device microseconds of the work launched in each phase of the profiled steps, and under STEP in the steps
    as a whole, from prof.events().

    A kernel belongs to the phase during which the op that launched it started on the host, whichever host thread
    that was. Not the phase range's own device_time_total: torch sums the kernels of the range's children on its
    own thread only, and on CUDA autograd runs the backward pass on a device thread of its own, so "backward"
    would show almost none of its kernels.
    """
    windows: dict[str, list[tuple[float, float, str]]] = {"phase": [], "step": []}
    for e in events:
        if e.device_type != DeviceType.CPU:  # the device-side copy of an annotation: its span, not its kernels
            continue
        if e.name in PHASES:
            windows["phase"].append((e.time_range.start, e.time_range.end, e.name))
        elif e.name.startswith(STEP):
            windows["step"].append((e.time_range.start, e.time_range.end, STEP))
    for spans in windows.values():
        spans.sort()
    starts = {kind: [s for s, _, _ in spans] for kind, spans in windows.items()}
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        # Annotations are skipped: a range may carry its device-side span as a "kernel", counted once already
        # through the ops inside it.
        annotation = e.is_user_annotation or e.name in PHASES or e.name.startswith(STEP)
        if e.device_type != DeviceType.CPU or annotation or not e.kernels:
            continue
        launched = e.time_range.start
        device_us = sum(k.duration for k in e.kernels)
        for kind, spans in windows.items():
            i = bisect.bisect_right(starts[kind], launched) - 1
            if i >= 0 and launched < spans[i][1]:
                totals[spans[i][2]] += device_us
    return dict(totals)


def summarise(averages, *, batch_size: int, kernel_us: dict[str, float] | None = None) -> dict:
    """Per-step ms of each phase and of the whole step, from prof.key_averages() of the active steps; with
    `kernel_us` (kernel_us_by_phase, CUDA runs) also each phase's device ms and the step's."""
    # On CUDA each annotation has a second, device-side entry of the same name (no host time): host entries only.
    averages = [e for e in averages if e.device_type == DeviceType.CPU]
    by_name = {e.key: e for e in averages}
    # One ProfilerStep#k range per step, from one prof.step() to the next: the step's wall time. Recent torch
    # versions merge them into one "ProfilerStep*" entry; older ones keep one entry per k.
    step_events = [e for e in averages if e.key.startswith(STEP)]
    measured = sum(e.count for e in step_events)
    if measured == 0:
        raise UsageError("no step was profiled: the training schedule ended during the warm-up steps")
    step_ms = sum(e.cpu_time_total for e in step_events) / 1000 / measured
    phases = {}
    for name in PHASES:
        e = by_name.get(name)
        cpu_ms = e.cpu_time_total / 1000 / measured if e else 0.0
        device_ms = None if kernel_us is None else kernel_us.get(name, 0.0) / 1000 / measured
        phases[name] = {"cpu_ms": cpu_ms, "device_ms": device_ms}
    # This tool runs train() in one process; under accelerate launch each rank would report its own share.
    num_processes = 1
    result = {
        "steps": measured, "batch_size": batch_size, "step_ms": step_ms,
        "img_per_s": batch_size * num_processes / (step_ms / 1000),
        "data_stall_share": phases["data_wait"]["cpu_ms"] / step_ms,
        "phases": phases, "other_ms": step_ms - sum(p["cpu_ms"] for p in phases.values()),
    }
    if kernel_us is not None:
        device_ms = kernel_us.get(STEP, 0.0) / 1000 / measured
        result.update(device_ms=device_ms, device_busy_share=device_ms / step_ms)
    return result


def report(result: dict) -> str:
    step_ms = result["step_ms"]
    device_ms = result.get("device_ms")  # CUDA runs only
    rows = [[name, p["cpu_ms"], p["device_ms"], 100 * p["cpu_ms"] / step_ms] for name, p in result["phases"].items()]
    other_device = None if device_ms is None else device_ms - sum(p["device_ms"] for p in result["phases"].values())
    rows.append(["other", result["other_ms"], other_device, 100 * result["other_ms"] / step_ms])
    rows.append(["step", step_ms, device_ms, 100.0])
    lines = [
        f"{result['steps']} steps of batch {result['batch_size']} on {result['device']}",
        table(["phase", "ms/step", "device ms/step", "% of step"], rows),
        f"{result['img_per_s']:.1f} img/s; data stall {100 * result['data_stall_share']:.1f}% of the step",
    ]
    if device_ms is not None:
        lines.append(f"device busy {100 * result['device_busy_share']:.1f}% of the step (kernel time over the wall "
                     f"time between synchronisations at step ends); ms/step of a phase = launch time on the host")
    return "\n".join(lines)
