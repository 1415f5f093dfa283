"""Loader-only throughput per backend, worker count and (reference backend) decode device, the batched stage's time
per batch, and their report."""

import itertools
import statistics
import time

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from pirl_trainer import pipelines
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.device_decode import DECODE_DEVICES
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.tools.profiling import UsageError, decode, machine
from pirl_trainer.tools.profiling.report import parse_list, table


def recipe_with(overrides: list[str]) -> PirlRecipe:
    """The full-resolution default recipe with `key=value` overrides, type-checked as in the training config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PirlRecipe), OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged).validate()
    except (OmegaConfBaseException, ValueError) as err:
        raise UsageError(f"--recipe-overrides: {str(err).splitlines()[0]}") from None


def decode_devices(text: str) -> list[str]:
    """--decode-devices: data.decode_device values, each one of DECODE_DEVICES."""
    devices = parse_list(text, "--decode-devices")
    for device in devices:
        if device not in DECODE_DEVICES:
            raise UsageError(f"--decode-devices: {device!r} is not one of {', '.join(DECODE_DEVICES)}")
    return devices


def loader_rate(backend: str, shard_dir: str, recipe: PirlRecipe, *, workers: int, batches: int,
                batch_size: int, decode_device: str = "workers") -> dict:
    """Samples/s of `batches` batches, wall clock, the first batch of each epoch left out: it pays for the
    workers' start-up, which a long run pays once. More epochs are read when one has too few batches.
    decode_device: the reference backend's data.decode_device (main-process decoding when not "workers"; a CUDA
    decode is synchronised before each batch is counted)."""
    extra = {"decode_device": decode_device} if backend == "reference" else {}
    loader = pipelines.make_loader(backend, shard_dir, recipe, batch_size=batch_size, num_workers=workers, seed=0,
                                   **extra)
    if len(loader) < 2:  # an epoch of one batch never gets past the start-up
        raise UsageError(f"--batch-size {batch_size}: {shard_dir} holds {loader.num_samples} samples, "
                         f"{len(loader)} batch per epoch; timing needs at least 2")
    timed = samples = 0
    elapsed = 0.0
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        batch_iter = iter(loader)
        next(batch_iter)
        start = time.perf_counter()
        for batch in batch_iter:
            machine.synchronize(batch["image"].device)
            samples += len(batch["index"])
            timed += 1
            if timed == batches:
                break
        elapsed += time.perf_counter() - start
        del batch_iter  # stops this epoch's workers before the next epoch starts its own
        if timed == batches:
            break
    rate = samples / elapsed
    return {"backend": backend, "decode_device": decode_device, "workers": workers, "batches": timed,
            "samples": samples, "samples_per_s": rate, "samples_per_s_per_core": rate / max(1, workers)}


def augment_ms(shard_dir: str, recipe: PirlRecipe, batch_size: int, device: torch.device, calls: int = 5) -> float:
    """Median ms of BatchAugment on one loader batch on `device`, after one warm-up call."""
    loader = pipelines.make_loader("reference", shard_dir, recipe, batch_size=batch_size, num_workers=0, seed=0)
    loader.set_epoch(0)
    raw = next(iter(loader))
    batch = {"image": raw["image"].to(device), "patches": raw["patches"].to(device), "index": raw["index"]}
    stage = BatchAugment(recipe)
    stage(batch, 0)
    times = []
    for _ in range(calls):
        machine.synchronize(device)
        start = time.perf_counter()
        stage(batch, 0)
        machine.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_loaders(shard_dir: str, backends: list[str], workers: list[int], *, batches: int, batch_size: int,
                    recipe: PirlRecipe, decode_devices: list[str] = ("workers",)) -> dict:
    """Every backend x worker count (x decode device, for the reference backend) against the decode limit."""
    jpegs, num_samples = decode.read_jpegs(shard_dir)
    before, skipped = decode.decode_rates(jpegs)
    results, unavailable = [], {}
    runs = [(b, d, w) for b in backends for d in (decode_devices if b == "reference" else ["workers"])
            for w in workers]
    for backend, device, w in tqdm(runs, desc="loaders", unit="run", leave=False):
        name = backend if device == "workers" else f"{backend} decode_device={device}"
        if name in unavailable:
            continue
        try:
            results.append(loader_rate(backend, shard_dir, recipe, workers=w, batches=batches, batch_size=batch_size,
                                       decode_device=device))
        except pipelines.BackendUnavailable as err:  # an optional backend (or CUDA) missing: say so, measure the rest
            unavailable[name] = str(err)
    after, skipped_after = decode.decode_rates(jpegs)
    limit = decode.decode_limit(before, after, {**skipped, **skipped_after})
    for r in results:
        r["ratio_to_decode"] = r["samples_per_s_per_core"] / limit["samples_per_s_per_core"]
    device = machine.default_device()
    return {
        "decode_limit": limit, "results": results,
        "augment_ms_per_batch": augment_ms(shard_dir, recipe, batch_size, device),
        "batch_size": batch_size, "device": machine.describe(device), "shards": str(shard_dir),
        "num_samples": num_samples, "decode_samples": len(jpegs), "unavailable_backends": unavailable,
    }


def report(result: dict) -> str:
    limit = result["decode_limit"]
    rows = [[r["backend"], r.get("decode_device", "workers"), r["workers"], r["samples_per_s"],
             r["samples_per_s_per_core"], r["ratio_to_decode"]] for r in result["results"]]
    decoders = ", ".join(f"{name} {rate:.1f}" for name, rate in sorted(limit["all"].items(), key=lambda kv: -kv[1]))
    lines = [
        f"{result['shards']}: {result['num_samples']} samples, batch {result['batch_size']}, {result['device']}",
        table(["backend", "decode_device", "workers", "samples/s", "samples/s/core", "ratio_to_decode"], rows),
        f"decode limit: {limit['samples_per_s_per_core']:.1f} samples/s/core ({limit['decoder']}, full decode of "
        f"{result['decode_samples']} JPEGs, best of before/after); all: {decoders}",
        f"batched stage (BatchAugment) on {result['device']}: {result['augment_ms_per_batch']:.1f} ms per batch",
    ]
    for backend, why in result.get("unavailable_backends", {}).items():
        lines.append(f"backend {backend} not measured: {why}")
    if limit["skipped"]:
        lines.append("decoders left out: " + "; ".join(f"{k} ({v})" for k, v in limit["skipped"].items()))
    return "\n".join(lines)
