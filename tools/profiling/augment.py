"""The batched stage against the per-view loop it replaces, side by side, on random full-resolution inputs.

The loop is what the reference loader did per sample before the stage existed: each view (the image and
each of its 9 patches) converted to float, jittered with torchvision's functional ops, normalised, one by one.
The same draws (pipelines.augment.draw_params) feed all three variants, so they do the same work.
"""

import time
import warnings

import torch
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from pirl_trainer.pipelines.augment import BatchAugment, draw_params
from pirl_trainer.pipelines.photometric import apply_photometric
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.tools.profiling import machine
from pirl_trainer.tools.profiling.report import table

EPOCH = 0


def random_batch(recipe: PirlRecipe, batch_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    s, k, p = recipe.image_size, recipe.view_tiles, recipe.view_tile_size
    return {"image": torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8, generator=g),
            "patches": torch.randint(0, 256, (batch_size, k, 3, p, p), dtype=torch.uint8, generator=g),
            "index": torch.arange(batch_size)}


def per_view_loop(recipe: PirlRecipe, batch: dict) -> dict:
    params = draw_params(recipe, 0, EPOCH, batch["index"])
    image_plans, tile_plans = params.image.plans(), params.tiles.plans()  # tiles: sample-major, k per sample
    image, patches = batch["image"], batch["patches"]
    out_image = torch.empty(image.shape, dtype=torch.float32)
    out_patches = torch.empty(patches.shape, dtype=torch.float32)
    k = patches.shape[1]
    for i in range(image.shape[0]):
        out_image[i] = _paint(image[i], image_plans[i], recipe)
        for j in range(k):
            out_patches[i, j] = _paint(patches[i, j], tile_plans[i * k + j], recipe)
    return {"image": out_image, "patches": out_patches, "index": batch["index"]}


def _paint(view: torch.Tensor, plan, recipe: PirlRecipe) -> torch.Tensor:
    return F.normalize(apply_photometric(view.float() / 255, plan), recipe.mean, recipe.std)


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def profile_augment(batch_size: int, repeats: int, threads: list[int], compile: bool) -> dict:
    recipe = PirlRecipe()
    batch = random_batch(recipe, batch_size)
    eager = BatchAugment(recipe, kernels="tensor")
    fused = BatchAugment(recipe, kernels="numba")
    fused(batch, EPOCH)  # numba compiles (or loads its cache) on the first call
    saved_threads = torch.get_num_threads()
    results, loop1 = [], None
    try:
        # The 1-thread loop is every variant's baseline: measured even when 1 is not in --threads.
        for t in tqdm(sorted(set(threads) | {1}), desc="threads", unit="setting", leave=False):
            torch.set_num_threads(t)
            r = {"threads": t, "loop_ms": best_ms(lambda: per_view_loop(recipe, batch), repeats)}
            loop1 = loop1 or r["loop_ms"]
            if t in threads:
                r["eager_ms"] = best_ms(lambda: eager(batch, EPOCH), repeats)
                r["numba_ms"] = best_ms(lambda: fused(batch, EPOCH), repeats)
                r.update(_compiled(recipe, batch, repeats) if compile else {"compile_s": None, "compiled_ms": None})
                results.append(r)
    finally:
        torch.set_num_threads(saved_threads)
    for r in results:
        compiled = r["compiled_ms"]
        r.update(loop_over_eager=r["loop_ms"] / r["eager_ms"], loop_over_numba=r["loop_ms"] / r["numba_ms"],
                 loop1_over_numba=loop1 / r["numba_ms"],
                 loop_over_compiled=r["loop_ms"] / compiled if compiled else None,
                 loop1_over_loop=loop1 / r["loop_ms"], loop1_over_eager=loop1 / r["eager_ms"],
                 loop1_over_compiled=loop1 / compiled if compiled else None)
    return {"batch_size": batch_size, "repeats": repeats, "image_size": recipe.image_size,
            "patch_size": recipe.patch_size, "device": machine.cpu_description(), "loop_1_thread_ms": loop1,
            "results": results}


def _compiled(recipe: PirlRecipe, batch: dict, repeats: int) -> dict:
    """Compiled stage: the first call (compilation, or a recompile for a new thread count) timed on its own."""
    stage = BatchAugment(recipe, kernels="compiled")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage(batch, EPOCH)
    first_s = time.perf_counter() - start
    if not stage.compile:  # BatchAugment fell back to eager kernels: no compiled numbers to report
        print(f"warning: torch.compile failed, no compiled timing: {caught[0].message if caught else ''}")
        return {"compile_s": None, "compiled_ms": None}
    return {"compile_s": first_s, "compiled_ms": best_ms(lambda: stage(batch, EPOCH), repeats)}


def report(result: dict) -> str:
    rows = [[r["threads"], r["loop_ms"], r["numba_ms"], r["eager_ms"], r["compiled_ms"], r["compile_s"],
             r["loop_over_numba"], r["loop_over_eager"], r["loop_over_compiled"], r["loop1_over_numba"],
             r["loop1_over_eager"], r["loop1_over_compiled"]]
            for r in result["results"]]
    return "\n".join([
        f"batch {result['batch_size']}: image {result['image_size']} px + 9 patches of {result['patch_size']} px, "
        f"ms per batch (best of {result['repeats']}), {result['device']}",
        table(["threads", "loop ms", "numba ms", "tensor ms", "compiled ms", "compile s", "loop/numba",
               "loop/tensor", "loop/compiled", "loop1/numba", "loop1/tensor", "loop1/compiled"], rows),
        "kernels: numba (default on the CPU), tensor (eager torch ops), compiled (torch.compile); loop1 = the "
        "per-view loop on 1 thread; compile s = the compiled stage's first call",
    ])
