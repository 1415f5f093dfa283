"""The acceptance run for a GPU: every claim the project makes about GPUs, measured in one process into one JSON.

Parts, in this order (PARTS), each in its own try/except and time budget; the JSON is rewritten after each, so a
killed run still leaves the finished parts:
- stage_vs_model: the batched augmentation stage on a full-recipe batch (kernels chosen as training chooses them
  on the device) against ResNet-50's forward + backward on the same batch (bf16 autocast, channels_last);
- step: profiled training steps of the full recipe (tools/profiling/step.py) with the reference backend and
  data.decode_device = workers, cpu and cuda, on JPEG shards this run makes (photo-like, ImageNet sizes);
- decode: nvJPEG's batched decode (torchvision.io.decode_jpeg on a list, device="cuda") against the CPU decoders
  on one core (tools/profiling/decode.py), on the same JPEGs;
- bank: per-sample against shared negatives on an ImageNet-size memory bank (tools/profiling/bank.py);
- sync_bn: the synchronised BatchNorms against one nn.BatchNorm2d over the same batch, in a world-size-1 group;
- cuda_tests: the test suite's `gpu` and `fake_cuda` tests, run in this process by pytest (last: a test that
  leaves global state behind cannot skew the timings).
With cpu_smoke every part runs at toy sizes on the CPU, what needs CUDA in its CPU form (the device is recorded).
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import platform
import signal
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch

from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import write_json

REPO = Path(__file__).resolve().parents[2]
STAGE_GOAL = 0.05  # the batched stage should cost at most 5 % of the model's forward + backward
DECODE_DEVICES = ("workers", "cpu", "cuda")  # data.decode_device values, the first the baseline
TRACEBACK_LINES = 15


@dataclass(frozen=True)
class Sizes:
    """What each part measures. The defaults are the acceptance run on one H100 (at most 8 minutes in all, the
    budgets below summing to 7.6); SMOKE the same code at toy sizes on a CPU."""

    arch: str = "resnet50"
    batch: int = 256  # per GPU: the batch the step is tuned for (the paper: 32 per GPU x 32 GPUs)
    recipe: dict = field(default_factory=dict)  # PirlRecipe overrides; none = the full recipe (224 / 255 / 64 px)
    stage_repeats: int = 10
    model_repeats: int = 5
    photos: int = 2560  # samples in the shards: 10 steps of 256, so the profiled steps stay in one epoch
    unique_photos: int = 160  # drawn photos; the rest repeat them (decode cost does not care)
    photo_scale: float = 1.0  # of the ImageNet-like sizes in PHOTO_SIZES
    workers: int = 14  # loader workers: 16 cores less the main process and one spare
    step_warmup: int = 3
    step_steps: int = 5
    num_negatives: int = 2048  # the bank of the step is the shards' size; the bank part measures ImageNet's
    decode_images: int = 256
    decode_passes: int = 2  # one-core CPU passes (the decoders all run, one after the other)
    gpu_decode_passes: int = 5
    bank_rows: int = 1_281_167  # ImageNet's training set
    bank_dim: int = 128
    bank_batches: tuple = (32, 256)  # the paper's per-GPU batch, and the batch tuned for here
    bank_negatives: int = 32_000
    bank_repeats: int = 3
    bn_shape: tuple = (256, 64, 56, 56)  # the input of ResNet-50's first BatchNorm at batch 256
    bn_repeats: int = 10
    budgets: dict = field(default_factory=lambda: {
        "stage_vs_model": 45, "step": 190, "decode": 35, "bank": 55, "sync_bn": 30, "cuda_tests": 100})


SMOKE = Sizes(
    arch="resnet18", batch=4, recipe={"image_size": 32, "jigsaw_size": 48, "patch_size": 16}, stage_repeats=2,
    model_repeats=2, photos=48, unique_photos=12, photo_scale=0.4, workers=1, step_warmup=1, step_steps=2,
    num_negatives=16, decode_images=24, decode_passes=1, gpu_decode_passes=2, bank_rows=2000, bank_dim=16,
    bank_batches=(4, 8), bank_negatives=200, bank_repeats=1, bn_shape=(8, 16, 8, 8), bn_repeats=2,
    budgets={"stage_vs_model": 30, "step": 60, "decode": 15, "bank": 15, "sync_bn": 15, "cuda_tests": 90})

# (width, height) of the drawn photos: ImageNet's common shapes (its median is 500 x 375 or 375 x 500).
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (333, 500), (500, 400), (400, 300))


class PartTimeout(BaseException):
    """A part ran past its budget. A BaseException, so that code under measurement catching Exception (a decoder
    that may be missing, a test) does not swallow it."""


@dataclass
class Context:
    """What the parts share: sizes, the device, a scratch folder, and the shards made on first use."""

    sizes: Sizes
    device: torch.device
    cpu_smoke: bool
    workdir: Path
    _shards: tuple[Path, dict] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shards(self) -> tuple[Path, dict]:
        """(shard folder, what it holds), made once from photos drawn here."""
        if self._shards is None:
            self._shards = make_photo_shards(self.workdir, self.sizes)
        return self._shards


# --- the run ---


def run_parts(parts: dict[str, Callable[[Context, dict], None]], ctx: Context, json_path: str | os.PathLike,
              header: dict) -> dict:
    """Each part fills its result dict in turn; a part that raises (or leaves failed sub-results) is recorded
    as failed with its error, the others still run. The JSON is rewritten after every part."""
    doc = {**header, "failed_parts": [], "finished": False,
           **{name: {"status": "not run", "budget_s": ctx.sizes.budgets.get(name)} for name in parts}}
    _write(json_path, doc)
    start = time.perf_counter()
    for name, part in parts.items():
        budget = ctx.sizes.budgets.get(name)
        print(f"gpu: {name} (budget {budget} s) ...", flush=True)
        out: dict = {}
        entry = {"status": "ok", "budget_s": budget, "result": out}
        part_start = time.perf_counter()
        try:
            with _time_budget(budget):
                part(ctx, out)
        except (Exception, PartTimeout) as err:
            entry["error"] = error_record(err)
        finally:
            entry["seconds"] = time.perf_counter() - part_start
            _free_device_memory()
        if "error" in entry or out.get("failed"):
            entry["status"] = "failed"
            doc["failed_parts"].append(name)
        doc[name] = entry
        _write(json_path, doc)
    doc["finished"] = True
    doc["total_seconds"] = time.perf_counter() - start
    _write(json_path, doc)
    return doc


def summary(doc: dict, parts) -> str:
    lines = [f"acceptance run on {doc['device']} ({doc['total_seconds']:.0f} s):"]
    for name in parts:
        entry = doc[name]
        failed = ", ".join(entry.get("result", {}).get("failed", []))
        why = entry["error"]["type"] + ": " + entry["error"]["message"][:200] if "error" in entry else failed
        state = "ok" if entry["status"] == "ok" else f"FAILED ({why})"
        lines.append(f"  {name}: {state} [{entry['seconds']:.1f} s of {entry['budget_s']} s]")
    return "\n".join(lines)


def error_record(err: BaseException) -> dict:
    lines = "".join(traceback.format_exception(err)).rstrip().splitlines()
    return {"type": type(err).__name__, "message": str(err), "traceback": lines[-TRACEBACK_LINES:]}


def sub_result(out: dict, key: str, fn: Callable[[], dict], into: dict | None = None) -> None:
    """into[key] = fn(), or its error; a failed sub-result is listed in out["failed"] and fails the part."""
    into = out if into is None else into
    try:
        into[key] = fn()
    except Exception as err:
        into[key] = {"error": error_record(err)}
        out.setdefault("failed", []).append(key)


@contextlib.contextmanager
def _time_budget(seconds: float | None):
    """Raise PartTimeout in this (main) thread once `seconds` have passed; a running kernel or C call finishes
    first."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"ran past its budget of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write(path, doc: dict) -> None:
    """Replace the JSON whole: a run killed while writing still leaves the previous version."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    write_json(partial, doc)
    os.replace(partial, path)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """The machine and the versions, with the device named."""
    import torchvision

    env = {
        "device": machine.describe(device), "device_type": device.type, "cpu": machine.cpu_description(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cudnn=torch.backends.cudnn.version(), device_memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    return env


def run_acceptance(json_path: str, *, cpu_smoke: bool, command: str, parts: list[str] | None = None) -> dict:
    """The whole run (or the named `parts`): the JSON at json_path, written after each part."""
    for name in parts or []:
        if name not in PARTS:
            raise UsageError(f"--parts: unknown part {name!r}; valid: {', '.join(PARTS)}")
    names = [name for name in PARTS if parts is None or name in parts]  # always in PARTS' order
    device = torch.device("cpu") if cpu_smoke else machine.default_device()
    if device.type != "cuda" and not cpu_smoke:
        raise UsageError("no CUDA device here: the acceptance run needs one (--cpu-smoke runs it on the CPU)")
    sizes = SMOKE if cpu_smoke else Sizes()
    header = {"command": command, "cpu_smoke": cpu_smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **environment(device)}
    with tempfile.TemporaryDirectory(prefix="pirl-gpu-") as tmp:
        ctx = Context(sizes, device, cpu_smoke, Path(tmp))
        doc = run_parts({name: PARTS[name] for name in names}, ctx, json_path, header)
    print(summary(doc, names))
    return doc


# --- timing ---


def device_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median ms of fn() with the device synchronised before and after each call (a host clock then measures
    the kernels, not their launch); the first `warmup` calls are not counted."""
    times = []
    for i in range(warmup + repeats):
        machine.synchronize(device)
        start = time.perf_counter()
        fn()
        machine.synchronize(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# --- the parts ---


def part_stage_vs_model(ctx: Context, out: dict) -> None:
    from pirl_trainer.model.pirl import PIRLNet
    from pirl_trainer.pipelines.augment import BatchAugment
    from pirl_trainer.pipelines.recipe import PirlRecipe
    from pirl_trainer.tools.profiling.augment import random_batch
    from pirl_trainer.train.config import DataConfig
    from pirl_trainer.train.pirl import patch_orders, to_device

    s, device = ctx.sizes, ctx.device
    recipe = PirlRecipe(**s.recipe)
    kernels = DataConfig.augment_kernels  # the trainer's default: numba on CPU batches, tensor ops on CUDA
    batch = to_device(random_batch(recipe, s.batch), device)  # uint8 loader batch on the device, index on the host
    stage = BatchAugment(recipe, kernels=kernels)

    def paint() -> dict:
        """The loop's augment phase (train/pirl.py): the stage, then the image view in channels_last."""
        views = stage(batch, 0)
        views["image"] = views["image"].contiguous(memory_format=torch.channels_last)
        return views

    out.update(batch=s.batch, image_size=recipe.image_size, patch_size=recipe.patch_size,
               num_patches=recipe.view_tiles, kernels=kernels, arch=s.arch, device=machine.describe(device))
    out["stage_ms"] = device_ms(paint, device, s.stage_repeats)

    torch.manual_seed(0)
    net = PIRLNet(s.arch, num_patches=recipe.view_tiles).to(device).to(memory_format=torch.channels_last).train()
    views = paint()
    image, patches = views["image"], views["patches"]
    order = patch_orders(0, 0, batch["index"], recipe.view_tiles).to(device)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            f_img, g_jig = net(image, patches, patch_order=order)
        # stands in for the loss: the same graph through both heads (tools/profiling/model.py)
        (-(f_img.float() * g_jig.float()).sum()).backward()

    out["model_ms"] = device_ms(forward_backward, device, s.model_repeats)
    out["stage_share"] = out["stage_ms"] / out["model_ms"]
    out["goal_share"] = STAGE_GOAL
    out["meets_goal"] = out["stage_share"] <= STAGE_GOAL


def part_step(ctx: Context, out: dict) -> None:
    from pirl_trainer.tools.profiling.step import profile_step

    s = ctx.sizes
    shard_dir, shard_info = ctx.shards()
    out["shards"] = shard_info
    base = [
        f"--data.shards={shard_dir}", "--data.backend=reference", f"--data.batch_size={s.batch}",
        f"--data.num_workers={s.workers}", f"--model.arch={s.arch}", "--run.bf16=true", "--run.channels_last=true",
        f"--loss.num_negatives={s.num_negatives}", "--optim.epochs=1", f"--run.cpu={str(not ctx.cuda).lower()}",
        *(f"--data.recipe.{k}={v}" for k, v in s.recipe.items()),
    ]
    out["overrides"] = base
    out["modes"] = {}
    for mode in DECODE_DEVICES:
        used = "cpu" if (mode == "cuda" and not ctx.cuda) else mode  # the CPU form stands in for the GPU decode

        def one(used=used, mode=mode):
            r = profile_step(None, [*base, f"--data.decode_device={used}"], steps=s.step_steps, warmup=s.step_warmup)
            r.pop("overrides")
            r.update(decode_device=used, stands_in_for=mode if used != mode else None)
            return r

        sub_result(out, mode, one, into=out["modes"])
        _free_device_memory()
    ok = {m: r for m, r in out["modes"].items() if "error" not in r}
    if "workers" in ok:
        base_rate = ok["workers"]["img_per_s"]
        out["speedup_over_workers"] = {m: r["img_per_s"] / base_rate for m, r in ok.items()}


def part_decode(ctx: Context, out: dict) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    from pirl_trainer.tools.profiling.decode import decode_rates, read_jpegs

    s = ctx.sizes
    shard_dir, _ = ctx.shards()
    jpegs, _ = read_jpegs(str(shard_dir), limit=s.decode_images)
    out.update(images=len(jpegs), mean_kb=sum(map(len, jpegs)) / len(jpegs) / 1000)
    rates, skipped = decode_rates(jpegs, passes=s.decode_passes)
    best = max(rates, key=rates.get)
    out.update(cpu_one_core=rates, cpu_skipped=skipped, best_cpu_decoder=best)

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    device = ctx.device  # the CPU form of the batched call where there is no GPU
    batch = s.batch

    def decode_all():
        for i in range(0, len(data), batch):
            decode_jpeg(data[i:i + batch], mode=ImageReadMode.RGB, device=device)

    ms = device_ms(decode_all, device, s.gpu_decode_passes)
    rate = len(jpegs) / (ms / 1000)
    out["batched"] = {"device": machine.describe(device), "device_type": device.type, "batch": batch,
                      "images_per_s": rate, "decoder": "torchvision.io.decode_jpeg(list, device=...)"}
    out["batched_over_best_core"] = rate / rates[best]


def part_bank(ctx: Context, out: dict) -> None:
    from pirl_trainer.tools.profiling.bank import profile_bank

    s = ctx.sizes
    out.update(rows=s.bank_rows, dim=s.bank_dim, negatives=s.bank_negatives, dtype="float32",
               device=machine.describe(ctx.device), batches={})
    threads = [1 if ctx.cpu_smoke else torch.get_num_threads()]
    for b in s.bank_batches:
        sub_result(out, str(b), lambda b=b: profile_bank(s.bank_rows, s.bank_dim, b, s.bank_negatives, "float32",
                                                          threads, s.bank_repeats, device=ctx.device),
                   into=out["batches"])
        _free_device_memory()


def part_sync_bn(ctx: Context, out: dict) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the part needs its own")
    backend = "nccl" if ctx.cuda else "gloo"
    out.update(backend=backend, world_size=1, shape=list(ctx.sizes.bn_shape), device=machine.describe(ctx.device))
    dist.init_process_group(backend, init_method=f"file://{ctx.workdir / 'process_group'}", rank=0, world_size=1)
    try:
        compare_batchnorms(ctx, out)
    finally:
        dist.destroy_process_group()


def compare_batchnorms(ctx: Context, out: dict) -> None:
    """Each synchronised BatchNorm's synchronised path, forced in this one process, against nn.BatchNorm2d."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    from pirl_trainer.model import sync_batchnorm

    device, shape, repeats = ctx.device, ctx.sizes.bn_shape, ctx.sizes.bn_repeats
    c = shape[1]
    g = torch.Generator().manual_seed(0)
    # Per-channel means far from 0 against their spread, as real activations can have.
    x = torch.randn(shape, generator=g) * torch.linspace(0.05, 3.0, c).view(1, c, 1, 1)
    x = (x + torch.linspace(-2.0, 20.0, c).view(1, c, 1, 1)).to(device)
    if ctx.cuda:
        x = x.contiguous(memory_format=torch.channels_last)  # the trunk's activations under run.channels_last
    upstream = torch.randn(shape, generator=g).to(device)

    def batchnorm(cls=nn.BatchNorm2d):
        bn = cls(c).to(device)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, c))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, c))
        return bn

    torch_bn = batchnorm()

    def torch_sync(inp):
        # nn.SyncBatchNorm falls back to plain batch norm on one process; its autograd function is the path every
        # rank of a multi-GPU run takes: local statistics, an all-gather over NCCL, the combined statistics.
        bn = torch_bn
        return SyncBatchNormFunction.apply(inp, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                           bn.momentum, dist.group.WORLD, 1)

    project_bn = batchnorm(sync_batchnorm.GlooSyncBatchNorm2d)

    def project_sync(inp):
        # A second rank holding no samples: the module's exchange (a differentiable all-reduce) runs in this one
        # process, and its statistics must come out as one BatchNorm's.
        with mock.patch.object(sync_batchnorm, "_world", lambda: 2):
            return project_bn(inp)

    reference_bn = batchnorm()
    variants = {"batchnorm": reference_bn}
    if ctx.cuda:
        variants["torch_sync"] = torch_sync
    else:
        out["torch_sync"] = {"skipped": "torch's SyncBatchNorm kernels (batch_norm_stats) exist for CUDA only"}
    variants["project_sync"] = project_sync

    def run(fn):
        inp = x.detach().clone().requires_grad_(True)
        y = fn(inp)
        (y * upstream).sum().backward()
        return y.detach(), inp.grad

    ref_out, ref_grad = run(reference_bn)
    for name, fn in variants.items():
        y, grad = run(fn)
        out[name] = {
            "ms": device_ms(lambda fn=fn: run(fn), device, repeats),
            "max_abs_diff_output": float((y - ref_out).abs().max()),
            "max_abs_diff_input_grad": float((grad - ref_grad).abs().max()),
        }
    out["used_by_the_trainer"] = "torch_sync (nn.SyncBatchNorm)" if ctx.cuda else "project_sync (GlooSyncBatchNorm2d)"


def part_cuda_tests(ctx: Context, out: dict) -> None:
    import pytest

    tests = REPO / "tests"
    if not tests.is_dir():
        raise FileNotFoundError(f"{tests}: the test suite is not beside this installation (run from a checkout)")
    budget = ctx.sizes.budgets.get("cuda_tests")
    outcomes = TestOutcomes(time.monotonic() + budget if budget else None)
    args = [str(tests), "-m", "gpu or fake_cuda", "-p", "no:cacheprovider", "-q", f"--rootdir={REPO}"]
    code = pytest.main(args, plugins=[outcomes])
    out.update(args=args, exit_code=int(code), counts=outcomes.counts, failures=outcomes.failures,
               skips=outcomes.skips)
    if outcomes.deadline is not None and time.monotonic() > outcomes.deadline:
        raise PartTimeout(f"ran past its budget of {budget} s (pytest stopped after the test running then)")
    if outcomes.failures or int(code) not in (0, 5):  # 5: nothing selected
        out.setdefault("failed", []).extend(f["id"] for f in outcomes.failures or [{"id": f"exit code {code}"}])


class TestOutcomes:
    """A pytest plugin: pass / fail / skip counts per marker group, the failures' ids and short messages, and a
    stop after the test during which the deadline passed."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.counts = {group: {"passed": 0, "failed": 0, "skipped": 0} for group in ("gpu", "fake_cuda")}
        self.failures: list[dict] = []
        self.skips: list[dict] = []
        self._failed_ids: set[str] = set()

    def pytest_collectreport(self, report):
        if report.failed:
            self.failures.append({"id": report.nodeid or "collection", "when": "collect",
                                  "message": _short_message(report)})

    def pytest_runtest_logreport(self, report):
        group = "gpu" if "gpu" in report.keywords else "fake_cuda"
        if report.failed and report.nodeid not in self._failed_ids:
            self._failed_ids.add(report.nodeid)
            self.counts[group]["failed"] += 1
            self.failures.append({"id": report.nodeid, "when": report.when, "message": _short_message(report)})
        elif report.skipped:
            self.counts[group]["skipped"] += 1
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips.append({"id": report.nodeid, "reason": reason})
        elif report.passed and report.when == "call":
            self.counts[group]["passed"] += 1

    def pytest_runtest_teardown(self, item, nextitem):
        if self.deadline is not None and time.monotonic() > self.deadline and nextitem is not None:
            item.session.shouldstop = "the time budget of the cuda_tests part is spent"


def _short_message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:500] if crash.message else ""
    text = str(report.longrepr).strip().splitlines()
    return text[-1][:500] if text else ""


PARTS: dict[str, Callable[[Context, dict], None]] = {
    "stage_vs_model": part_stage_vs_model, "step": part_step, "decode": part_decode, "bank": part_bank,
    "sync_bn": part_sync_bn, "cuda_tests": part_cuda_tests,
}


# --- the data: photo-like JPEGs at ImageNet sizes, as shards ---


def draw_photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 3) uint8 that compresses like a photo (~100 KB as a quality-90 JPEG at 500 x 375): smooth
    colour gradients and waves, a few soft shapes, a texture a few pixels wide, and fine noise. Random pixels
    would be far larger and flat ones far smaller, and decode time follows the JPEG's size."""
    from PIL import Image, ImageDraw, ImageFilter

    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    corners = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    img = corners[0] + (corners[1] - corners[0]) * x + (corners[2] - corners[0]) * y
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 3)
        img = img + rng.uniform(10, 40, 3).astype(np.float32) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 10))):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    texture = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    texture = np.asarray(texture.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)[..., None] - 127.5
    fine = rng.standard_normal((height, width, 3), dtype=np.float32)
    return np.clip(np.asarray(pil, dtype=np.float32) + 2.0 * texture + 5.0 * fine, 0, 255).astype(np.uint8)


def make_photo_shards(workdir: Path, sizes: Sizes, seed: int = 0) -> tuple[Path, dict]:
    """`sizes.photos` JPEGs (from `sizes.unique_photos` drawn ones) in an ImageFolder tree of 10 classes, made
    into shards by tools/make_shards.py's build_shards. Returns (shard folder, what it holds)."""
    from PIL import Image

    from pirl_trainer.tools.make_shards import build_shards

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    drawn = []
    for i in range(sizes.unique_photos):
        w, h = (max(16, round(v * sizes.photo_scale)) for v in PHOTO_SIZES[i % len(PHOTO_SIZES)])
        buffer = io.BytesIO()
        Image.fromarray(draw_photo(w, h, rng)).save(buffer, format="JPEG", quality=90)
        drawn.append(buffer.getvalue())
    images = workdir / "images"
    for i in range(sizes.photos):
        folder = images / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(drawn[i % len(drawn)])
    shard_dir = workdir / "shards"
    workers = 0 if sizes.photos < 500 else min(8, os.cpu_count() or 1)  # spawned checkers pay off on many files
    manifest = build_shards(images, shard_dir, workers=workers)
    info = {"num_samples": manifest["num_samples"], "unique_photos": len(drawn),
            "mean_jpeg_kb": sum(map(len, drawn)) / len(drawn) / 1000,
            "sizes": sorted({f"{w}x{h}" for w, h in (Image.open(io.BytesIO(b)).size for b in drawn)}),
            "seconds": time.perf_counter() - start}
    return shard_dir, info

