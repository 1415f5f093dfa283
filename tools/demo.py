"""The main job on the embedded default, end to end on CPU, no download:

    synthetic images -> tools/make_shards.py -> train/pirl.py (a few minutes) -> checkpoint
    -> train/linear_probe.py (res2..res5, best layer) on the PIRL trunk and on a random-init trunk, each under both
    BatchNorm protocols (precise and running statistics) -> per-layer table, final line, summary.json, summary.png.

    python tools/demo.py [--out runs/demo] [--per-class 60] [--epochs 40] [--knn-every 95]

summary.json: pirl_top1 = the worse of PIRL's two protocols, random_init_top1 = the better of random init's two
(the claim "PIRL learns" needs the first above the second), margin, and every probe's per-layer top-1.
summary.png: the loss over steps (from the run's log.jsonl), the kNN top-1 over steps against the random-init
trunk's (unless --knn-every 0), and the best-layer probe top-1 of both trunks per protocol.

The steps call the same entry points as their command lines (printed as they run). Data: tools/synthetic_data.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pirl_trainer.tools.experiment import (PROTOCOLS, grouped_bars, pretrain, pretrain_overrides, probe_protocols,
                                           pyplot, random_init_trunk, save_figure)
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.tools.synthetic_data import write_synthetic
from pirl_trainer.train import linear_probe
from pirl_trainer.train.config import PirlConfig, load_config

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="working folder (images, shards, run, results)")
    parser.add_argument("--per-class", type=int, default=60, help="synthetic training images per class (10 classes)")
    parser.add_argument("--epochs", type=int, default=40, help="PIRL epochs over the synthetic training set")
    parser.add_argument("--workers", type=int, default=2, help="shard-writer processes and DataLoader workers")
    # every 5 epochs of the default set (19 steps each): 8 points on the curve for ~20 s of the budget
    parser.add_argument("--knn-every", type=int, default=95,
                        help="kNN monitor every N steps (res5, test images) drawn against the random-init value; 0 = off")
    args = parser.parse_args(argv)
    out = Path(args.out)
    prepare_out(out)
    started = time.perf_counter()

    step("1. synthetic images (the embedded default; no download)", f"python tools/synthetic_data.py --output {out}/images/train")
    write_synthetic(out / "images" / "train", per_class=args.per_class, seed=0)
    write_synthetic(out / "images" / "test", per_class=max(10, args.per_class // 2), seed=1)

    for split in ("train", "test"):
        step(f"2. shards ({split})", f"python tools/make_shards.py --input {out}/images/{split} --output {out}/shards/{split}")
        manifest = build_shards(out / "images" / split, out / "shards" / split, workers=args.workers, show_progress=True)
        print(f"   {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s), "
              f"{len(manifest['skipped'])} skipped, {len(manifest['classes'])} classes")

    run_dir = out / "run"
    train, test = f"{out}/shards/train", f"{out}/shards/test"
    extra = [
        # the config's 512 negatives need > 512 training images; a smaller --per-class draws all the others
        f"--loss.num_negatives={min(512, 10 * args.per_class - 1)}",
    ]
    if args.knn_every > 0:
        extra += [f"--knn.every={args.knn_every}", f"--knn.test_shards={test}"]
    ckpt = pretrain([CONFIG], train, run_dir, args.epochs, args.workers, extra,
                    announce=lambda command: step("3. PIRL pretraining", command))["checkpoint"]

    cfg = load_config(PirlConfig, str(CONFIG), pretrain_overrides(train, run_dir, args.epochs, args.workers, extra))
    # Both BatchNorm protocols for both trunks: "precise" re-estimates the statistics on the probe's training
    # images, "running" keeps the trunk's own (a random trunk's are mean 0 / variance 1, which happens to suit
    # it). The claim "PIRL learns" compares PIRL's worse protocol against random init's better one.
    results: dict[str, dict[str, dict]] = {}
    for name, trunk in (("pirl", [f"--checkpoint={ckpt}"]), ("random_init", random_init_trunk(cfg))):
        results[name] = probe_protocols(
            trunk, train, test, args.workers, output=lambda bn: out / f"probe_{name}_{bn}.json",
            announce=lambda bn, command: step(f"4. linear probe ({name}, {bn} BN)", command))

    knn_random = None
    if args.knn_every > 0:
        # the random-init trunk's kNN top-1 (its running statistics, as the monitor uses): the curve's baseline
        knn_random = random_init_knn(cfg, out)["knn_top1"]

    pirl_top1 = min(r["top1"] for r in results["pirl"].values())
    random_top1 = max(r["top1"] for r in results["random_init"].values())
    summary = {
        "pirl_top1": pirl_top1,  # the worse of PIRL's two BatchNorm protocols
        "random_init_top1": random_top1,  # the better of the random-init trunk's two
        "margin": pirl_top1 - random_top1,
        "probes": {
            name: {bn: {"top1": r["top1"], "best_layer": r["best_layer"], "per_layer": r["per_layer"]}
                   for bn, r in by_bn.items()}
            for name, by_bn in results.items()
        },
        "knn_random_init_top1": knn_random,
        "checkpoint": ckpt,
        "minutes": (time.perf_counter() - started) / 60,
    }
    png = out / "summary.png"
    summary["plot"] = str(png)
    plot_summary(run_dir / "log.jsonl", summary, png)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\nlinear-probe top-1 per layer (held-out synthetic test images):")
    print(f"  {'trunk':<12}{'BN':<9}" + "".join(f"{layer:>8}" for layer in linear_probe.STAGES) + "    best")
    for name, by_bn in results.items():
        for bn, r in by_bn.items():
            cells = "".join(f"{r['per_layer'].get(layer, float('nan')):>7.1f}%" for layer in linear_probe.STAGES)
            print(f"  {name:<12}{bn:<9}{cells}  {r['top1']:5.1f}% ({r['best_layer']})")
    pirl_p, pirl_r = (results["pirl"][bn]["top1"] for bn in PROTOCOLS)
    print(f"\nlinear-probe top-1 (best layer) on held-out synthetic images: PIRL {pirl_p:.1f}% (precise BN) / "
          f"{pirl_r:.1f}% (running BN) vs random init best {random_top1:.1f}%: {summary['margin']:+.1f} points "
          f"({summary['minutes']:.1f} min; {out}/summary.json)")
    print(f"plot: {png}")
    return summary


def random_init_knn(cfg: PirlConfig, out: Path) -> dict:
    """The kNN monitor's number for the random-init trunk (same seed as the probe's random trunk)."""
    import torch

    from pirl_trainer.model.trunk import build_trunk
    from pirl_trainer.train.knn_monitor import KnnMonitor

    torch.manual_seed(0)
    trunk, _ = build_trunk(cfg.model.arch)
    k = cfg.knn
    monitor = KnnMonitor(str(out / "shards" / "train"), str(out / "shards" / "test"), cfg.data.recipe,
                         batch_size=k.batch_size, num_workers=cfg.data.num_workers, k=k.k, temperature=k.temperature)
    return monitor.evaluate(trunk, "cpu")


def plot_summary(log_path: Path, summary: dict, png: Path) -> None:
    """Loss over steps (and the kNN curve against the random-init value when the monitor ran), and the
    best-layer probe top-1 of PIRL vs random init per BatchNorm protocol."""
    from pirl_trainer.train.run_log import read_jsonl

    plt = pyplot()

    records = read_jsonl(log_path)
    losses = [r for r in records if "loss" in r]
    knn = [r for r in records if "knn_top1" in r]
    fig, axes = plt.subplots(1, 3 if knn else 2, figsize=(15 if knn else 10, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], marker=".", label="loss (eq. 5)")
    for key in ("loss_image", "loss_jigsaw"):
        if losses and key in losses[0]:
            ax.plot([r["step"] for r in losses], [r[key] for r in losses], label=key, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("PIRL pretraining")
    ax.legend()
    if knn:
        ax = axes[1]
        ax.plot([0] + [r["step"] for r in knn], [summary["knn_random_init_top1"]] + [r["knn_top1"] for r in knn],
                marker="o", label="PIRL trunk")
        ax.axhline(summary["knn_random_init_top1"], color="grey", linestyle="--", label="random init")
        ax.set_xlabel("step")
        ax.set_ylabel("kNN top-1 (%), res5, test images")
        ax.set_title("kNN monitor")
        ax.legend()
    ax = axes[-1]
    probes = summary["probes"]
    tops = {name: [probes[name][bn]["top1"] for bn in PROTOCOLS] for name in ("pirl", "random_init")}
    bars = grouped_bars(ax, [f"{bn} BN" for bn in PROTOCOLS], tops, 0.38,
                        colours={"pirl": "tab:blue", "random_init": "tab:grey"})
    for name, by_bn in bars.items():
        for bar, bn in zip(by_bn, PROTOCOLS):
            ax.annotate(f"{bar.get_height():.1f}\n{probes[name][bn]['best_layer']}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("linear-probe top-1 (%), best layer")
    ax.set_title(f"PIRL {summary['pirl_top1']:.1f} vs random init {summary['random_init_top1']:.1f}: "
                 f"{summary['margin']:+.1f} points", fontsize=10)
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left")
    save_figure(fig, png, dpi=100)


if __name__ == "__main__":
    main()
