"""Negatives from the memory bank: per-sample draws (the paper's) against one shared draw per batch.

Each variant times one step's bank work for the loss: draw the negatives (counter draws keyed by (seed, step),
what a rank-independent run uses), fetch the positives' and negatives' rows, and pirl_loss (binary NCE, both
terms, fixed log Z) forward and backward to the two head outputs. On the same bank and queries:
- shared: one draw of K rows for the batch, gathered once, one (2B, D) x (D, K) product;
- per_sample: B x K draws, as MemoryBank.negatives + pirl_loss run them (negative_similarities "auto": the dense
  product over the bank while it has at most DENSE_ROWS_PER_NEGATIVE * K rows, else blockwise gathers);
- per_sample_gather, per_sample_dense: the two methods forced;
- per_sample_materialised: the (B, K, D) rows fetched first, then the loss (what train/pirl.py did before
  MemoryBank.negatives, and the reference implementation's way).
The bank holds clustered unit vectors (cosines spread as in a trained bank, positives near 0.9). With a
half-precision --dtype, the loss and its gradient are also compared with a float32 bank of the same rows.
"""

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pirl_trainer.model.losses import (DENSE_ROWS_PER_NEGATIVE, Negatives, estimate_log_z, negative_similarities,
                                       pirl_loss)
from pirl_trainer.model.memory_bank import MemoryBank
from pirl_trainer.tools.profiling import UsageError, machine
from pirl_trainer.tools.profiling.report import table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("shared", "per_sample", "per_sample_gather", "per_sample_dense", "per_sample_materialised")
# Variants whose largest temporary would pass this are skipped (the dense logits, the materialised rows).
MAX_TEMP_BYTES = 4 * 2**30
SEED = 0
# The reference implementation's NCE forward alone (VISSL nce_loss.py, per-sample draws) on one core of a 2-core
# CPU, measured outside this repository (VISSL is not a dependency): shown beside the per-sample figures at the
# same sizes.
VISSL_FORWARD = {"rows": 100_000, "dim": 128, "batch": 64, "negatives": 32_000, "ms": 1756.0}


def realistic_embeddings(rows: int, dim: int, batch: int, device: torch.device, clusters: int = 1000):
    """(bank (rows, dim), index (batch,), queries (2, batch, dim)): unit vectors around `clusters` centres, so
    that cosines within a cluster are ~0.5 and across ~0; the two queries lie near their own rows (~0.9)."""
    g = torch.Generator().manual_seed(SEED)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    which = torch.randint(0, clusters, (rows,), generator=g)
    bank = F.normalize(centres[which] + torch.randn(rows, dim, generator=g) / math.sqrt(dim), dim=1)
    index = torch.randperm(rows, generator=g)[:batch]
    queries = F.normalize(bank[index] + 0.35 * torch.randn(2, batch, dim, generator=g) / math.sqrt(dim), dim=2)
    return bank.to(device), index.to(device), queries.to(device)


def _temp_bytes(variant: str, rows: int, dim: int, batch: int, negatives: int) -> int:
    if variant == "per_sample_materialised":
        return batch * negatives * dim * 4
    if variant == "per_sample_dense":
        return 2 * 2 * batch * rows * 4  # logits and their gradient, two queries
    return 0


class _Step:
    """One variant's draw / fetch / loss on a bank, timed phase by phase."""

    def __init__(self, bank: MemoryBank, index, queries, negatives: int, log_z, variant: str):
        self.bank, self.index, self.queries, self.num, self.log_z, self.variant = (
            bank, index, queries, negatives, log_z, variant)

    def draw(self, step: int, generator: torch.Generator | None = None):
        shared = self.variant == "shared"
        if generator is not None:
            return self.bank.draw_negatives(self.index, self.num, shared=shared, generator=generator)
        return self.bank.draw_negatives(self.index, self.num, shared=shared, seed=SEED, step=step)

    def fetch(self, neg_rows):
        bank_pos = self.bank.fetch(self.index)
        if self.variant == "per_sample_materialised":
            return bank_pos, self.bank.fetch(neg_rows)
        if self.variant in ("per_sample_gather", "per_sample_dense"):
            return bank_pos, Negatives(self.bank.rows, neg_rows, self.variant.removeprefix("per_sample_"))
        return bank_pos, self.bank.negatives(neg_rows)

    def loss(self, bank_pos, bank_neg, backward: bool = True):
        g_jig, f_img = (q.clone().requires_grad_(backward) for q in self.queries)
        out = pirl_loss(bank_pos, g_jig, f_img, bank_neg, kind="nce", log_z=self.log_z,
                        num_data=self.bank.num_rows)
        if backward:
            out["loss"].backward()
        return out["loss"].detach(), torch.stack([g_jig.grad, f_img.grad]) if backward else None

    def timed(self, step: int, device: torch.device) -> dict:
        clock = _Clock(device)
        neg_rows = self.draw(step)
        clock.lap("draw_ms")
        bank_pos, bank_neg = self.fetch(neg_rows)
        clock.lap("fetch_ms")
        self.loss(bank_pos, bank_neg)
        clock.lap("loss_ms")
        return clock.times


class _Clock:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {}
        machine.synchronize(device)
        self.start = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        machine.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = 1000 * (now - self.last)
        self.times["total_ms"] = 1000 * (now - self.start)
        self.last = now


def _best(steps: dict[str, _Step], repeats: int, device: torch.device) -> dict[str, dict]:
    """Each variant's fastest step (its phases from that step). Variants take turns, one step each per round, so
    a change in the shared machine's load falls on all of them alike; round 0 is a warm-up."""
    best: dict[str, dict] = {}
    for r in range(repeats + 1):
        for name, step in steps.items():
            times = step.timed(r, device)
            if r and (name not in best or times["total_ms"] < best[name]["total_ms"]):
                best[name] = times
    return best


def _draw_generator_ms(step: _Step, repeats: int, device: torch.device) -> float:
    g = torch.Generator(device=device).manual_seed(SEED)
    times = []
    for _ in range(repeats + 1):
        clock = _Clock(device)
        step.draw(0, generator=g)
        clock.lap("draw_ms")
        times.append(clock.times["draw_ms"])
    return min(times[1:])


def deviation_vs_fp32(bank: MemoryBank, bank32: MemoryBank, index, queries, negatives: int, log_z) -> dict:
    """Loss and gradient of a half-precision bank against a float32 bank of the unrounded rows, same draws."""
    out = {}
    for variant in ("shared", "per_sample"):
        results = []
        for b in (bank, bank32):
            s = _Step(b, index, queries, negatives, log_z, variant)
            results.append(s.loss(*s.fetch(s.draw(7))))
        (loss, grad), (loss32, grad32) = results
        out[variant] = {
            "loss": float(loss), "loss_fp32": float(loss32),
            "loss_rel_diff": float((loss - loss32).abs() / loss32.abs()),
            "grad_rel_diff": float((grad - grad32).norm() / grad32.norm()),
        }
    return out


def profile_bank(rows: int, dim: int, batch: int, negatives: int, dtype: str, threads: list[int],
                 repeats: int, device: torch.device | None = None) -> dict:
    """The variants' best step times on a bank of `rows` x `dim` (on `device`, default the GPU where there is one)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if rows < batch + 1:
        raise UsageError(f"--rows: the bank needs more rows than the batch ({batch}), got {rows}")
    if negatives > rows - batch:
        raise UsageError(f"--negatives: at most rows - batch = {rows - batch} for a shared draw, got {negatives}")
    device = machine.default_device() if device is None else device
    rows32, index, queries = realistic_embeddings(rows, dim, batch, device)
    bank32 = MemoryBank(rows, dim).to(device)
    bank32.rows.copy_(rows32)
    bank = MemoryBank(rows, dim, dtype=DTYPES[dtype]).to(device)
    bank.rows.copy_(rows32)
    # Wu et al.'s constant from one shared draw of the float32 bank, then fixed: every variant computes the
    # same function.
    with torch.no_grad():
        ids = bank32.draw_negatives(index, negatives, shared=True, seed=SEED, step=0)
        sims = negative_similarities(queries, bank32.fetch(ids))
        pos = (queries * bank32.fetch(index)).sum(-1)
        log_z = estimate_log_z(pos, sims, 0.07, rows)

    results = []
    saved_threads = torch.get_num_threads()
    try:
        for t in tqdm(threads, desc="threads", unit="setting", leave=False):
            torch.set_num_threads(t)
            # Variants whose temporaries would pass MAX_TEMP_BYTES are skipped (None).
            steps = {name: _Step(bank, index, queries, negatives, log_z, name) for name in VARIANTS
                     if _temp_bytes(name, rows, dim, batch, negatives) <= MAX_TEMP_BYTES}
            best = _best(steps, repeats, device)
            variants = {name: best.get(name) for name in VARIANTS}
            per_sample = variants["per_sample"]["total_ms"]
            shared = variants["shared"]["total_ms"]
            materialised = variants["per_sample_materialised"]
            results.append({
                "threads": t, "variants": variants, "ratio": per_sample / shared,
                "ratio_materialised": materialised["total_ms"] / shared if materialised else None,
                "draw_generator_ms": _draw_generator_ms(
                    _Step(bank, index, queries, negatives, log_z, "per_sample"), repeats, device),
            })
    finally:
        torch.set_num_threads(saved_threads)

    first = results[0]
    result = {
        "rows": rows, "dim": dim, "batch": batch, "negatives": negatives, "dtype": dtype, "threads": threads,
        "repeats": repeats, "device": machine.describe(device),
        "per_sample_ms": first["variants"]["per_sample"]["total_ms"],
        "shared_ms": first["variants"]["shared"]["total_ms"],
        "ratio": first["ratio"],
        "per_sample_method": "dense" if rows <= DENSE_ROWS_PER_NEGATIVE * negatives else "gather",
        "bank_bytes": bank.nbytes, "bank_bytes_fp32": bank32.nbytes,
        "results": results,
        "deviation_vs_fp32": None if dtype == "float32"
        else deviation_vs_fp32(bank, bank32, index, queries, negatives, log_z),
    }
    settings = {k: result[k] for k in ("rows", "dim", "batch", "negatives")}
    if settings == {k: v for k, v in VISSL_FORWARD.items() if k != "ms"}:
        result["reference_vissl_forward_ms"] = VISSL_FORWARD["ms"]
    return result


def report(result: dict) -> str:
    lines = [
        f"bank {result['rows']:,} x {result['dim']} {result['dtype']} ({result['bank_bytes'] / 2**20:.1f} MiB), "
        f"batch {result['batch']}, {result['negatives']:,} negatives, best of {result['repeats']}, "
        f"{result['device']}",
    ]
    for r in result["results"]:
        rows = []
        for name, v in r["variants"].items():
            if v is None:
                rows.append([name, None, None, None, None, "skipped (memory)"])
                continue
            rows.append([name, v["draw_ms"], v["fetch_ms"], v["loss_ms"], v["total_ms"],
                         v["total_ms"] / r["variants"]["shared"]["total_ms"]])
        lines.append(f"\n{r['threads']} thread(s): per-sample draw with a torch.Generator instead of counter "
                     f"hashing {r['draw_generator_ms']:.1f} ms")
        lines.append(table(["variant", "draw ms", "fetch ms", "loss fwd+bwd ms", "total ms", "x shared"], rows))
    lines.append(f"\nper_sample ({result['per_sample_method']}) / shared = {result['ratio']:.1f}x "
                 f"({result['results'][0]['threads']} thread(s))")
    if "reference_vissl_forward_ms" in result:
        lines.append(f"reference implementation (VISSL nce_loss, per-sample, forward alone, one core): "
                     f"{result['reference_vissl_forward_ms']:,.0f} ms")
    if result["deviation_vs_fp32"]:
        for mode, d in result["deviation_vs_fp32"].items():
            lines.append(f"{result['dtype']} vs float32 bank, {mode}: loss {d['loss']:.6g} vs {d['loss_fp32']:.6g} "
                         f"(relative {d['loss_rel_diff']:.2e}), gradient relative {d['grad_rel_diff']:.2e}")
        lines.append(f"bank memory {result['bank_bytes']:,} B vs {result['bank_bytes_fp32']:,} B in float32")
    return "\n".join(lines)
