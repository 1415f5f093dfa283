"""The experiment steps tools/demo.py and tools/paper_table.py share: pretrain a method into a run folder
(train/pirl.py), probe a trunk under both BatchNorm protocols (train/linear_probe.py), and the grouped bar charts
that draw those probes.

A protocol is a name and linear_probe's precise_bn: "precise" re-estimates the trunk's BatchNorm statistics on the
probe's training images, "running" keeps the trunk's own (docs/evaluation.md).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pirl_trainer.train import checkpoint, linear_probe, pirl
from pirl_trainer.train.config import PirlConfig

PROTOCOLS = {"precise": True, "running": False}  # protocol name -> linear_probe's precise_bn
METHOD_CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs" / "methods"


def method_config(name: str) -> Path:
    """train/configs/methods/NAME.yaml, the few keys a method sets on a shared recipe; ValueError naming the
    shipped ones for another name."""
    path = METHOD_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in METHOD_CONFIGS.glob("*.yaml"))
        raise ValueError(f"no method config {name!r} in {METHOD_CONFIGS}; shipped: {', '.join(shipped)}")
    return path


def precise_bn_arg(precise: bool) -> str:
    """linear_probe's command-line option for a protocol's precise_bn value."""
    return f"--precise_bn={str(precise).lower()}"


def pretrain_overrides(train: Path | str, run_dir: Path | str, epochs: int, workers: int,
                       extra: Sequence[str] = ()) -> list[str]:
    """train/pirl.py's overrides for a run on `train` shards into `run_dir`, then `extra` (which win)."""
    return [f"--data.shards={train}", f"--run.out_dir={run_dir}", f"--optim.epochs={epochs}",
            f"--data.num_workers={workers}", *extra]


def pretrain(configs: Sequence[Path | str], train: Path | str, run_dir: Path | str, epochs: int, workers: int,
             extra: Sequence[str], announce: Callable[[str], None]) -> dict:
    """Train with the YAML `configs` in order (a recipe, then e.g. a method's) and pretrain_overrides; `announce`
    gets the equivalent command line first. Returns the latest checkpoint's path, the minutes taken and the last
    logged record."""
    argv = [arg for config in configs for arg in ("--config", str(config))]
    argv += pretrain_overrides(train, run_dir, epochs, workers, extra)
    announce(f"accelerate launch train/pirl.py {' '.join(argv)}")
    started = time.perf_counter()
    record = pirl.main(argv)
    return {"checkpoint": str(checkpoint.latest_checkpoint(run_dir)), "minutes": (time.perf_counter() - started) / 60,
            "last_record": record}


def random_init_trunk(cfg: PirlConfig) -> list[str]:
    """linear_probe's options for a random-init trunk of the run's arch at its image size."""
    return [f"--arch={cfg.model.arch}", f"--image_size={cfg.data.recipe.image_size}"]


def probe_protocols(trunk_args: Sequence[str], train: Path | str, test: Path | str, workers: int,
                    output: Callable[[str], Path], announce: Callable[[str, str], None] | None = None) -> dict:
    """Each protocol's per-layer probe of one trunk (`trunk_args`: --checkpoint=... or random_init_trunk), written
    to output(protocol). A probe already there with the current probe settings is reused; one made with other
    settings (e.g. before the weight decay was chosen per layer) is redone. `announce(protocol, command)` is called
    before each probe that runs. Returns {protocol: linear_probe's result}."""
    results = {}
    settings = linear_probe.probe_settings(linear_probe.ProbeConfig())
    for protocol, precise in PROTOCOLS.items():
        path = output(protocol)
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        if earlier.get("settings") == settings:
            results[protocol] = earlier
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        args = [*trunk_args, f"--train_shards={train}", f"--test_shards={test}", f"--output={path}",
                f"--num_workers={workers}", precise_bn_arg(precise)]
        if announce is not None:
            announce(protocol, f"python train/linear_probe.py {' '.join(args)}")
        results[protocol] = linear_probe.main(args)
    return results


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]], width: float,
                 colours: dict[str, str] | None = None) -> dict:
    """One bar per series in every group, side by side and centred on the group's tick (series in order, left to
    right); the groups' names label the ticks. Returns each series' bars, for annotations."""
    bars = {}
    for j, (name, values) in enumerate(series.items()):
        offset = (j - (len(series) - 1) / 2) * width
        style = {"color": colours[name]} if colours else {}
        bars[name] = ax.bar([i + offset for i in range(len(groups))], values, width, label=name, **style)
    ax.set_xticks(list(range(len(groups))), list(groups))
    return bars


def save_figure(fig, path: Path, dpi: int, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay the figure out (inside `rect`, in figure fractions, when given), write it as a PNG and free it."""
    plt = pyplot()
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
