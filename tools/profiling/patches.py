"""The patch pass: the B*9 patches through the trunk as one batch, against a loop over the nine, each in the
contiguous (NCHW) and channels_last memory formats, forward + backward, side by side in one run.

The variants run interleaved, round after round, and each reports its median: on a shared machine a slow
spell then hits every variant alike, and the ratios stay meaningful.
"""

import statistics
import time

import torch

from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.tools.profiling import machine
from pirl_trainer.tools.profiling.report import table

VARIANTS = ("batched", "looped", "batched_channels_last", "looped_channels_last")


def _pass(trunk, patches: torch.Tensor, looped: bool) -> None:
    """Forward + backward of the trunk on (B, K, 3, P, P) patches, as PIRLNet does (one call) or per slot."""
    b, k = patches.shape[:2]
    if looped:
        feats = torch.stack([trunk(patches[:, j]) for j in range(k)], dim=1)
    else:
        flat = patches.reshape(b * k, *patches.shape[2:])
        if patches.is_contiguous(memory_format=torch.channels_last) or patches.stride(-3) == 1:
            flat = flat.contiguous(memory_format=torch.channels_last)
        feats = trunk(flat).reshape(b, k, -1)
    feats.square().sum().backward()


def profile_patches(arch: str, batch: int, patch_size: int, repeats: int, num_patches: int = 9) -> dict:
    torch.manual_seed(0)
    trunks = {fmt: build_trunk(arch)[0] for fmt in ("contiguous", "channels_last")}
    trunks["channels_last"] = trunks["channels_last"].to(memory_format=torch.channels_last)
    trunks["channels_last"].load_state_dict(trunks["contiguous"].state_dict())
    base = torch.randn(batch, num_patches, 3, patch_size, patch_size)
    # channels_last per patch: (B, K, P, P, 3) storage seen as (B, K, 3, P, P), as the loaders deliver it.
    inputs = {"contiguous": base, "channels_last": base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(repeats + 1):  # round 0 warms every variant up and is not counted
        for variant in VARIANTS:
            fmt = "channels_last" if variant.endswith("channels_last") else "contiguous"
            trunk = trunks[fmt]
            trunk.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _pass(trunk, inputs[fmt], looped=variant.startswith("looped"))
            if round_:
                times[variant].append(time.perf_counter() - start)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    return {
        "arch": arch, "batch": batch, "patch_size": patch_size, "num_patches": num_patches, "repeats": repeats,
        "ms": ms, "looped_over_batched": ms["looped"] / ms["batched"],
        "channels_last_speedup": ms["batched"] / ms["batched_channels_last"],
        "threads": torch.get_num_threads(), "device": machine.cpu_description(),
    }


def report(result: dict) -> str:
    rows = [[v, result["ms"][v], result["ms"][v] / result["ms"]["batched"]] for v in VARIANTS]
    return "\n".join([
        f"{result['arch']} trunk, forward + backward of {result['batch']} x {result['num_patches']} patches of "
        f"{result['patch_size']} px, median of {result['repeats']} rounds, {result['threads']} threads, "
        f"{result['device']}",
        table(["variant", "ms", "ratio_to_batched"], rows),
        f"one batch of B*{result['num_patches']} is {result['looped_over_batched']:.2f}x faster than the loop; "
        f"channels_last: {result['channels_last_speedup']:.2f}x on the batched pass",
    ])
