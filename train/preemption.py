"""SIGTERM, what schedulers (SLURM, Kubernetes) send before they preempt a job: finish the step, checkpoint, exit.

The handler only records the signal; the training loop asks `requested()` between steps, so a checkpoint is
never written from inside a signal handler or halfway through a step. With several processes every rank must
stop at the same step (the checkpoint is collective): the flag is all-reduced on log steps, so a run stops
within run.log_every steps of the signal; one process stops after the current step.
"""

import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator


class StopOnSigterm:
    """Records SIGTERM from construction until restore() (call it in a `finally`), then puts back the old handler."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = signal.signal(signal.SIGTERM, self._record)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def stopped(self, step: int, checkpoint: Path) -> str:
        """What a run says when it stopped on the signal: the step and the checkpoint that --resume continues from."""
        return (f"stopped on {self.signal_name or 'SIGTERM'} after step {step}: checkpoint {checkpoint} written; "
                "continue with --resume")

    def requested(self, accelerator: Accelerator, log_step: bool) -> bool:
        """Whether every rank should stop after this step."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        if not log_step:
            return False
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)
