"""The main job on the embedded default, end to end on CPU, no download:

    synthetic images -> tools/make_shards.py -> train/pirl.py (a few minutes) -> checkpoint
    -> train/linear_probe.py on the PIRL trunk and on a random-init trunk -> top-1 of both printed.

    python tools/demo.py [--out runs/demo] [--per-class 60] [--epochs 8]

The steps call the same entry points as their command lines (printed as they run). Data: tools/synthetic_data.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tools.make_shards import build_shards
from tools.synthetic_data import write_synthetic
from train import linear_probe, pirl
from train.config import PirlConfig, load_config

MARKER = ".pirl-demo"  # written into --out, so that a re-run may clear a folder this tool made and no other
CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "cpu_small.yaml"


def prepare_out(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by tools/demo.py: pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by tools/demo.py; a re-run deletes this folder\n")


def step(title: str, command: str) -> None:
    print(f"\n== {title}\n   $ {command}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="working folder (images, shards, run, results)")
    parser.add_argument("--per-class", type=int, default=60, help="synthetic training images per class (10 classes)")
    parser.add_argument("--epochs", type=int, default=8, help="PIRL epochs over the synthetic training set")
    parser.add_argument("--workers", type=int, default=2, help="shard-writer processes and DataLoader workers")
    args = parser.parse_args()
    out = Path(args.out)
    prepare_out(out)
    started = time.perf_counter()

    step("1. synthetic images (the embedded default; no download)", f"python tools/synthetic_data.py --output {out}/images/train")
    write_synthetic(out / "images" / "train", per_class=args.per_class, seed=0)
    write_synthetic(out / "images" / "test", per_class=max(10, args.per_class // 3), seed=1)

    for split in ("train", "test"):
        step(f"2. shards ({split})", f"python tools/make_shards.py --input {out}/images/{split} --output {out}/shards/{split}")
        manifest = build_shards(out / "images" / split, out / "shards" / split, workers=args.workers, show_progress=True)
        print(f"   {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s), "
              f"{len(manifest['skipped'])} skipped, {len(manifest['classes'])} classes")

    run_dir = out / "run"
    overrides = [
        f"--data.shards={out}/shards/train", f"--run.out_dir={run_dir}", f"--optim.epochs={args.epochs}",
        f"--data.num_workers={args.workers}",
    ]
    step("3. PIRL pretraining", f"accelerate launch train/pirl.py --config {CONFIG} {' '.join(overrides)}")
    pirl.main(["--config", str(CONFIG), *overrides])

    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    cfg = load_config(PirlConfig, str(CONFIG), overrides)
    random_trunk = [f"--arch={cfg.model.arch}", f"--image_size={cfg.data.recipe.image_size}"]
    results = {}
    for name, trunk in (("pirl", [f"--checkpoint={ckpt}"]), ("random_init", random_trunk)):
        probe_args = [
            *trunk, f"--train_shards={out}/shards/train", f"--test_shards={out}/shards/test",
            f"--output={out}/probe_{name}.json", f"--num_workers={args.workers}",
        ]
        step(f"4. linear probe ({name})", f"python train/linear_probe.py {' '.join(probe_args)}")
        results[name] = linear_probe.main(probe_args)

    summary = {
        "pirl_top1": results["pirl"]["top1"],
        "random_init_top1": results["random_init"]["top1"],
        "checkpoint": str(ckpt),
        "minutes": (time.perf_counter() - started) / 60,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nlinear-probe top-1 on synthetic test images: PIRL {summary['pirl_top1']:.1f}% vs "
          f"random init {summary['random_init_top1']:.1f}% ({summary['minutes']:.1f} min; {out}/summary.json)")


if __name__ == "__main__":
    main()
