"""PNG charts of the loaders and step results (matplotlib, no display needed)."""

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine and never opens a window

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def loaders_chart(result: dict, path: str) -> None:
    """Samples/s per core of each backend x workers, against the decode limit."""
    limit = result["decode_limit"]
    labels = [f"{r['backend']}\n{r['workers']} worker{'s' if r['workers'] != 1 else ''}" for r in result["results"]]
    rates = [r["samples_per_s_per_core"] for r in result["results"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 4))
    ax.bar_label(ax.bar(range(len(rates)), rates, color="tab:blue"), fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(rates)), labels)
    ax.axhline(limit["samples_per_s_per_core"], color="tab:red", linestyle="--",
               label=f"decode limit ({limit['decoder']}, full decode): {limit['samples_per_s_per_core']:.0f}/s")
    ax.set_ylabel("samples/s per core")
    ax.set_title(f"Loaders, batch {result['batch_size']}\n{result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def step_chart(result: dict, path: str) -> None:
    """ms per step of each phase (and the rest), top to bottom in step order."""
    names = [*result["phases"], "other"]
    ms = [p["cpu_ms"] for p in result["phases"].values()] + [result["other_ms"]]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.bar_label(ax.barh(range(len(names)), ms, color="tab:blue"), fmt="%.1f", fontsize=8, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (CPU wall time of the phase)")
    ax.set_title(f"Step {result['step_ms']:.1f} ms, batch {result['batch_size']}, {result['img_per_s']:.1f} img/s\n"
                 f"{result['device']}", fontsize=9)
    _save(fig, path)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
