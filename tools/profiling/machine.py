"""Which device a measurement ran on: the only place that asks whether CUDA is there."""

import os

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a host clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux
        pass
    return f"cpu: {model} ({os.cpu_count()} cores)"


def describe(device: torch.device) -> str:
    """A human description: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()
