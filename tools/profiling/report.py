"""Text and JSON output shared by the subcommands."""

import json
import os
import shlex
from pathlib import Path

from pirl_trainer.tools.profiling import UsageError


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "tools/profile.py", *argv])


def write_json(path: str | os.PathLike, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def table(headers: list[str], rows: list[list]) -> str:
    """Columns aligned on their widest cell; floats with 3 significant figures at least one decimal."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:#.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def parse_list(text: str, option: str, convert=str, minimum: int | None = None) -> list:
    """'a,b,c' -> [convert(a), ...], or a UsageError naming the option and the bad item."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        try:
            value = convert(item) if item else None
        except ValueError:
            value = None
        if value is None:
            raise UsageError(f"{option}: {item!r} is not a valid value (in {text!r})")
        if minimum is not None and value < minimum:
            raise UsageError(f"{option}: {item!r} must be >= {minimum}")
        out.append(value)
    return out
