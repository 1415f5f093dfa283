"""The paper's comparison at small scale: every method pretrained with the same recipe and budget, each trunk's
linear probe per layer under both BatchNorm protocols, against the best random-init probe; a table and a PNG.

    python tools/paper_table.py --data ../shared/data/imagenette --out runs/paper_table \
        [--config train/configs/imagenette_cpu.yaml] \
        [--methods pirl,npid,jigsaw,rotation,pirl_rotation,supervised,simclr,moco] \
        [--epochs 8] [--workers 2] [--set optim.lr=0.5 ...]

--data holds train/ and test/ class folders (or is a folder of shards made by tools/make_shards.py with train/ and
test/ inside). Each method trains with `--config CONFIG --config train/configs/methods/METHOD.yaml` plus the
given epochs, so the methods differ in their objective only. `supervised` (the train split's labels) is the
ceiling on the same budget: with it in the table, each method's row also says which share of supervised's gain over
random init it reaches (the paper's ImageNet: PIRL 63.6, supervised 75.9). `moco` keeps as many keys in its queue
as the recipe's memory-bank negatives (method_overrides). Finished runs and probes are reused on a re-run (delete the
method's folder to redo it). Writes OUT/results.json, OUT/table.md and OUT/table.png.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pirl_trainer.pipelines.shard_format import MANIFEST_NAME
from pirl_trainer.tools import experiment
from pirl_trainer.tools.experiment import (PROTOCOLS, grouped_bars, probe_protocols, pyplot, random_init_trunk,
                                           save_figure)
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.train.config import PirlConfig, load_config

METHODS = ("pirl", "npid", "jigsaw", "rotation", "pirl_rotation", "supervised", "simclr", "moco")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "imagenette_cpu.yaml"
# ImageNet linear-probe top-1 (ResNet-50), kept beside ours in results.json. PIRL's Table 2 (best layer) for pirl,
# npid, jigsaw and supervised. Its MoCo row (60.6) is MoCo v1; moco here is MoCo v2, whose paper (Chen, Fan, Girshick
# & He 2020, "Improved baselines", Table 2) gives 71.1 after 800 epochs (PIRL's 63.6 is 800 epochs too) and, in the
# same table, SimCLR's 69.3 (1,000 epochs, batch 4,096; SimCLR's own paper, Chen et al. 2020, reports the same).
PAPER_TOP1 = {"pirl": 63.6, "npid": 59.0, "jigsaw": 45.7, "supervised": 75.9, "simclr": 69.3, "moco": 71.1}


def shards_for(data: Path, out: Path, split: str, workers: int) -> Path:
    """data/split as shards: used as they are when they are shards, made once into out/shards/split otherwise."""
    if (data / split / MANIFEST_NAME).is_file():
        return data / split
    target = out / "shards" / split
    if not (target / MANIFEST_NAME).is_file():
        build_shards(data / split, target, workers=workers, show_progress=True)
    return target


def method_overrides(method: str, cfg: PirlConfig) -> list[str]:
    """What one method sets on the shared recipe `cfg` (already with --set), before --set (which still wins)."""
    if method == "moco":
        # MoCo's queue of 65,536 keys is 5 % of ImageNet; on Imagenette's 4,000 training images it would hold every
        # image 16 times over, which train/pair_methods.py refuses. It holds as many keys as PIRL and NPID draw
        # negatives from their memory bank per query (loss.num_negatives), so that the contrastive methods differ in
        # their objective, not in how many negatives each query meets.
        return [f"--loss.moco_queue_size={cfg.loss.num_negatives}"]
    if method == "simclr":
        # SimCLR's appendix B.1: at small batches LARS does better with the rate 0.075 x sqrt(batch) than with 0.3 x
        # batch / 256 (0.6 against 0.075 at batch 64); optim.lr is quoted at optim.reference_batch and scaled linearly
        batch = cfg.data.batch_size
        return [f"--optim.lr={0.075 * math.sqrt(batch) * 256 / batch:g}", "--optim.reference_batch=256"]
    return []


def pretrain(method: str, config: Path, train: Path, out: Path, epochs: int, workers: int, extra: list[str]) -> dict:
    """Train `method` (or reuse a finished run); returns its checkpoint, minutes and last logged record."""
    run_dir = out / method
    done = run_dir / "pretrain.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = experiment.pretrain([config, experiment.method_config(method)], train, run_dir, epochs, workers, extra,
                                 announce=lambda command: print(f"\n== pretraining {method}: {command}", flush=True))
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def probe(name: str, trunk_args: list[str], train: Path, test: Path, out: Path, workers: int) -> dict:
    """Both protocols' per-layer probes of one trunk (cached in out/name/probe_PROTOCOL.json; a cached probe made
    with other probe settings, e.g. before the weight decay was chosen per layer, is redone)."""
    return probe_protocols(trunk_args, train, test, workers,
                           output=lambda protocol: out / name / f"probe_{protocol}.json")


def summarise(probes: dict[str, dict], pretraining: dict[str, dict]) -> dict:
    """Per method: best layer per protocol, the worse protocol's best (a gain must hold under both), its margin
    over the best random-init probe (over both protocols) and, with a supervised row, that margin as a share of
    supervised's (None without one, or when supervised does not beat random init)."""
    random_best = max(p["top1"] for p in probes["random_init"].values())
    rows = {}
    for name, by_protocol in probes.items():
        worst = min(p["top1"] for p in by_protocol.values())
        rows[name] = {
            "per_layer": {protocol: p["per_layer"] for protocol, p in by_protocol.items()},
            "best": {protocol: {"top1": p["top1"], "layer": p["best_layer"]} for protocol, p in by_protocol.items()},
            "worse_protocol_top1": worst,
            "margin_over_random": worst - random_best,
            "pretrain_minutes": pretraining.get(name, {}).get("minutes"),
            "paper_imagenet_top1": PAPER_TOP1.get(name),
        }
    ceiling = rows["supervised"]["margin_over_random"] if "supervised" in rows else None
    for row in rows.values():
        row["share_of_supervised_gain"] = row["margin_over_random"] / ceiling if ceiling and ceiling > 0 else None
    return {"random_init_best": random_best, "methods": rows}


def markdown(summary: dict) -> str:
    layers = list(next(iter(summary["methods"].values()))["per_layer"]["precise"])
    shares = "supervised" in summary["methods"]
    head = ["method", *[f"{layer} (precise / running)" for layer in layers], "best, worse protocol",
            "vs best random", *(["share of supervised's gain"] if shares else []), "pretrain min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["methods"].items():
        cells = [name]
        for layer in layers:
            cells.append(" / ".join(f"{row['per_layer'][p][layer]:.1f}" for p in PROTOCOLS))
        cells.append(f"{row['worse_protocol_top1']:.1f}")
        cells.append("—" if name == "random_init" else f"{row['margin_over_random']:+.1f}")
        if shares:
            share = row["share_of_supervised_gain"]
            cells.append("—" if name == "random_init" or share is None else f"{share:.0%}")
        cells.append("—" if row["pretrain_minutes"] is None else f"{row['pretrain_minutes']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    names = list(summary["methods"])
    layers = list(summary["methods"][names[0]]["per_layer"]["precise"])
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(5 * len(PROTOCOLS), 4), sharey=True)
    width = 0.8 / len(names)
    for ax, protocol in zip(axes, PROTOCOLS):
        grouped_bars(ax, layers, {name: [summary["methods"][name]["per_layer"][protocol][layer] for layer in layers]
                                  for name in names}, width)
        ax.axhline(summary["random_init_best"], color="black", linestyle="--", linewidth=1,
                   label=f"best random init ({summary['random_init_best']:.1f})")
        ax.set_title(f"linear probe, {protocol} BatchNorm statistics", fontsize=9)
        ax.set_ylabel("top-1 (%)")
    handles, labels = axes[0].get_legend_handles_labels()  # below the plots: above them it hides the bars
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    save_figure(fig, path, dpi=120, rect=(0, 0.05 + 0.045 * ((len(labels) - 1) // 4), 1, 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with train/ and test/ (class folders or shards)")
    parser.add_argument("--out", default="runs/paper_table")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe every method shares")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs, the same for every method")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every method's pretraining, e.g. optim.lr=0.5")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = (shards_for(data, out, split, args.workers) for split in ("train", "test"))
    extra = [f"--{item}" for item in args.set]

    cfg = load_config(PirlConfig, args.config, [f"--data.shards={train}", *extra])
    pretraining = {m: pretrain(m, Path(args.config), train, out, args.epochs, args.workers,
                               [*method_overrides(m, cfg), *extra]) for m in methods}
    probes = {"random_init": probe("random_init", random_init_trunk(cfg), train, test, out, args.workers)}
    for m in methods:
        probes[m] = probe(m, [f"--checkpoint={pretraining[m]['checkpoint']}"], train, test, out, args.workers)
    summary = summarise(probes, pretraining)
    summary["command"] = {"config": args.config, "epochs": args.epochs, "set": args.set, "methods": methods}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown(summary))
    plot(summary, out / "table.png")
    print("\n" + markdown(summary))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'table.png'}")
    return summary


if __name__ == "__main__":
    main()
