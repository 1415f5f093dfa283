"""The training loop's log window: the logged terms summed over the steps since the last record, turned into one
record of means (log.jsonl and TensorBoard through train/run_log.py) every run.log_every steps, with the
throughput and the share of the time the loop waited for data; and the non-finite check on those sums.

    window = LogWindow(LOG_TERMS[method], accelerator, out_dir, run_log, log_every=50, last_step=n, global_batch=256)
    window.add(losses, share, waited)    # every step: device additions only, no host read
    if window.due(step):
        record = window.record(step, epoch, skipped, lr)   # one all-reduce and one host sync; NonFiniteLoss

The sums stay on the device between records, so a plain step reads nothing back to the host; the all-reduce makes
every rank's record (and its non-finite verdict) the global one.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pirl_trainer.train.checkpoint import latest_checkpoint
from pirl_trainer.train.run_log import RunLog


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the steps, the terms and the last checkpoint."""

    def __init__(self, terms: dict, first: int, last: int, out_dir: Path):
        bad = ", ".join(f"{k} = {float(v):g}" for k, v in terms.items()
                        if k.startswith("loss") and not math.isfinite(float(v)))
        steps = f"step {last}" if first >= last else f"steps {first}-{last}"
        latest = latest_checkpoint(out_dir)
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


class TimedWindow:
    """The step count, wall time and data wait since the window (re)started; time spent in evaluations is left out
    (paused()). The pretraining loop's LogWindow and the online probe's window build on it."""

    def _restart(self) -> None:
        self.steps, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside is not counted as training time (the throughput and the data-wait share)."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start


class LogWindow(TimedWindow):
    """The steps since the last log record: each term's sum of (this rank's batch mean x its share of the global
    batch), summed over the ranks when recorded, so a record holds global means; and the wall time and data wait
    of those steps. Time spent in evaluations is left out (paused())."""

    def __init__(self, terms: Sequence[str], accelerator: Accelerator, out_dir: Path, run_log: RunLog | None, *,
                 log_every: int, last_step: int, global_batch: int):
        self.accelerator, self.out_dir, self.run_log = accelerator, out_dir, run_log
        self.log_every, self.last_step, self.global_batch = log_every, last_step, global_batch
        self.sums: dict = dict.fromkeys(terms, 0.0)
        self.last: dict = {}  # the latest record: what train() returns
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: 0.0 for k in self.sums}
        self._restart()

    def add(self, losses: dict, share: float, waited: float) -> None:
        """One step's terms (losses[term]: this rank's values), its share of the global batch, and the seconds
        the loop waited for its batch."""
        self.steps += 1
        self.data_wait += waited
        for key in self.sums:
            self.sums[key] += losses[key].detach().mean() * share  # summed over ranks: the global mean

    def due(self, step: int) -> bool:
        """Whether global step `step` ends a window: every run.log_every steps, and the last step."""
        return step % self.log_every == 0 or step == self.last_step

    def record(self, step: int, epoch: int, skipped: int, lr: float) -> dict:
        """The window's record (written to the run log on the main process), then a fresh window. `skipped`: this
        rank's corrupt samples left out so far this epoch (summed over the ranks here). NonFiniteLoss first where
        a term was not finite."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "epoch": epoch}
        sums = window_sums(self.accelerator, {**self.sums, "skipped": float(skipped)}, self.accelerator.device)
        skipped = int(sums.pop("skipped"))  # corrupt samples left out so far this epoch, all ranks
        check_finite(sums, step - self.steps + 1, step, self.out_dir)
        record.update({k: v / self.steps for k, v in sums.items()})
        record["skipped"] = skipped
        record["lr"] = lr
        record["img_per_s"] = self.steps * self.global_batch / elapsed
        record["data_wait_frac"] = self.data_wait / elapsed
        if self.run_log is not None:
            self.run_log.write(record)
        self.last = record
        self._reset()
        return record

    def check(self, step: int) -> None:
        """NonFiniteLoss where a term of the window so far (up to global step `step`) was not finite: before a
        checkpoint, so that none holds NaN weights."""
        check_finite(window_sums(self.accelerator, self.sums, self.accelerator.device), step - self.steps + 1, step,
                     self.out_dir)


class ProgressLine:
    """The tqdm progress bar of the main process: the last record's loss, throughput, data-wait share and skipped
    samples, and the last kNN and classifier results, each kept until the next one."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self.logged: dict = {}
        self.knn: dict = {}
        self.eval: dict = {}

    def show(self, record: dict) -> None:
        self.logged = dict(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}",
                           data_wait=f"{100 * record['data_wait_frac']:.0f}%", skipped=record["skipped"], **self.knn,
                           **self.eval)
        self.bar.set_postfix(self.logged)

    def show_knn(self, result: dict) -> None:
        self.knn = {"knn": f"{result['knn_top1']:.1f}%"}
        self.bar.set_postfix({**self.logged, **self.knn})

    def show_eval(self, result: dict) -> None:
        self.eval = {"top1": f"{result['eval_top1']:.1f}%", "top5": f"{result['eval_top5']:.1f}%"}
        self.bar.set_postfix({**self.logged, **self.knn, **self.eval})

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
