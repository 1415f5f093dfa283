"""tools/profiling/step.py's timing: the CPU path reads host clocks; on a faked CUDA the device is synchronised only
at the ends of the measured steps, and each phase's device time is the kernels it launched, whichever thread."""
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from pirl_trainer.tools.profiling import machine, step
from pirl_trainer.tools.profiling.step import PHASES, STEP, StepSynchronizer, kernel_us_by_phase, summarise

CPU_KEYS = {"steps", "batch_size", "step_ms", "img_per_s", "data_stall_share", "phases", "other_ms"}


def avg(key: str, cpu_us: float, count: int = 1, device_type=DeviceType.CPU):
    """A stand-in for one FunctionEventAvg of prof.key_averages()."""
    return SimpleNamespace(key=key, cpu_time_total=cpu_us, count=count, device_type=device_type,
                           device_time_total=0.0)


def test_summarise_on_the_cpu_reads_host_clocks_only():
    averages = [avg("ProfilerStep*", 40_000, count=2), avg("data_wait", 4_000, count=2),
                avg("backward", 10_000, count=2), avg("aten::mm", 30_000, count=50)]
    result = summarise(averages, batch_size=8)
    assert result.keys() == CPU_KEYS  # no device keys on the CPU
    assert result["steps"] == 2 and result["step_ms"] == 20.0
    assert result["phases"]["data_wait"] == {"cpu_ms": 2.0, "device_ms": None}
    assert result["phases"]["backward"] == {"cpu_ms": 5.0, "device_ms": None}
    assert result["phases"]["loss"] == {"cpu_ms": 0.0, "device_ms": None}  # a phase that did not run
    assert result["other_ms"] == 13.0 and result["data_stall_share"] == 0.1
    assert result["img_per_s"] == 400.0


def test_summarise_reads_device_times_and_ignores_the_device_side_copies_of_annotations():
    # On CUDA every range also appears as a device-side entry of the same name with no host time.
    averages = [avg("ProfilerStep*", 40_000, count=2), avg("ProfilerStep*", 0, count=2, device_type=DeviceType.CUDA),
                avg("backward", 10_000, count=2), avg("backward", 0, count=2, device_type=DeviceType.CUDA),
                avg("data_wait", 4_000, count=2)]
    kernel_us = {"backward": 24_000, "augment": 2_000, STEP: 30_000}
    result = summarise(averages, batch_size=8, kernel_us=kernel_us)
    assert result["steps"] == 2 and result["step_ms"] == 20.0  # the device copies are not steps
    assert result["phases"]["backward"] == {"cpu_ms": 5.0, "device_ms": 12.0}
    assert result["phases"]["augment"] == {"cpu_ms": 0.0, "device_ms": 1.0}
    assert result["phases"]["loss"]["device_ms"] == 0.0
    assert result["device_ms"] == 15.0 and result["device_busy_share"] == 0.75
    assert "device busy 75.0%" in step.report({**result, "device": "a GPU"})


def event(name, start, end, thread=1, kernels=(), annotation=False, device_type=DeviceType.CPU):
    e = FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, device_type=device_type,
                      is_user_annotation=annotation)
    for us in kernels:
        e.append_kernel("kernel", 0, us)
    return e


def test_kernels_belong_to_the_phase_that_launched_them_whichever_thread():
    events = [
        event("ProfilerStep#3", 0, 300, annotation=True),
        event("loss", 50, 100, annotation=True),
        event("backward", 100, 200, annotation=True, kernels=[999]),  # its device-side span: not a kernel
        event("backward", 100, 230, device_type=DeviceType.CUDA, annotation=True),
        event("aten::mul", 60, 70, kernels=[5, 5]),  # main thread, in loss
        event("bank_draw", 62, 66, annotation=True, kernels=[500]),  # a nested range's device span, in loss
        event("autograd::engine::evaluate_function: MulBackward0", 120, 140, thread=2, kernels=[30]),  # backward
        event("aten::add_", 250, 260, kernels=[7]),  # in the step, in no phase
        event("aten::sum", 400, 410, kernels=[11]),  # after the profiled step
        event("aten::empty", 70, 80),  # launches nothing
    ]
    assert kernel_us_by_phase(events) == {"loss": 10, "backward": 30, STEP: 47}


class FakeProfile:
    """torch.profiler.profile's part profile_step uses, logging its step() calls."""

    def __init__(self, log, averages, events, **kwargs):
        self.log, self.averages, self.events_, self.kwargs = log, averages, events, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self):
        self.log.append("prof.step")

    def key_averages(self):
        return self.averages

    def events(self):
        return self.events_


@pytest.fixture
def faked(monkeypatch):
    """profile_step with a fake profiler, a fake train() (`steps` of work, each ended by profiler.step()) and a
    logging machine.synchronize; returns (log, run(device_type, warmup, steps) -> result, seen)."""
    log, seen = [], {}
    averages = [avg("ProfilerStep*", 30_000, count=3), avg("backward", 6_000, count=3)]
    events = [event("ProfilerStep#2", 0, 100, annotation=True), event("backward", 10, 50, annotation=True),
              event("aten::mm", 20, 30, thread=2, kernels=[60])]

    def fake_train(cfg, profiler=None):
        seen["profiler"] = profiler
        for i in range(cfg.run.max_steps):
            log.extend([("begin", i), ("end", i)])
            profiler.step()

    def run(device_type: str, warmup: int, steps: int) -> dict:
        monkeypatch.setattr(machine, "default_device", lambda: torch.device(device_type))
        monkeypatch.setattr(machine, "describe", lambda device: f"fake {device.type}")
        monkeypatch.setattr(step, "profile", lambda **kw: seen.setdefault("prof", FakeProfile(log, averages, events,
                                                                                               **kw)))
        return step.profile_step(None, ["--data.shards=unused", "--run.cpu=false"], steps=steps, warmup=warmup)

    from pirl_trainer.train import pirl

    monkeypatch.setattr(pirl, "train", fake_train)
    monkeypatch.setattr(machine, "synchronize", lambda device: log.append(("sync", device.type)))
    return log, run, seen


@pytest.mark.fake_cuda
@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")  # warmup=0 is the point of that case
@pytest.mark.parametrize("warmup", [0, 2])
def test_cuda_synchronises_only_at_the_ends_of_the_measured_steps(faked, warmup):
    log, run, seen = faked
    result = run("cuda", warmup=warmup, steps=3)
    assert isinstance(seen["profiler"], StepSynchronizer)
    assert torch.profiler.ProfilerActivity.CUDA in seen["prof"].kwargs["activities"]
    # Before the first measured step, then at the end of each measured step, just before the profiler's step.
    expected = [("sync", "cuda")] if warmup == 0 else []
    for i in range(warmup + 3):
        expected += [("begin", i), ("end", i)]
        if i >= warmup - 1:
            expected.append(("sync", "cuda"))
        expected.append("prof.step")
    assert log == expected
    assert log.count(("sync", "cuda")) == 4
    assert result["device"] == "fake cuda"
    assert result["phases"]["backward"] == {"cpu_ms": 2.0, "device_ms": 0.02}  # the thread-2 kernel, over 3 steps
    assert result["device_ms"] == pytest.approx(0.02) and result["step_ms"] == 10.0


def test_the_cpu_path_hands_train_the_profiler_itself_and_never_synchronises(faked):
    log, run, seen = faked
    result = run("cpu", warmup=1, steps=3)
    assert seen["profiler"] is seen["prof"]
    assert seen["prof"].kwargs["activities"] == [torch.profiler.ProfilerActivity.CPU]
    assert not any(isinstance(entry, tuple) and entry[0] == "sync" for entry in log)
    assert log.count("prof.step") == 4
    assert result.keys() == CPU_KEYS | {"config", "overrides", "device"}
    assert all(p["device_ms"] is None for p in result["phases"].values())
    assert set(result["phases"]) == set(PHASES)
