"""Run logs: one JSON object per line (log.jsonl) and, optionally, TensorBoard events, from the main process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, out_dir: Path, tensorboard: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out_dir / "log.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def start_run_folder(out_dir: Path, config_yaml: str, tensorboard: bool, main_process: bool) -> RunLog | None:
    """The main process writes the run's resolved config (config.yaml) into out_dir and opens its run log; None
    on the other processes. Shared by pretraining (run.out_dir) and the online probe (online_out_dir)."""
    if not main_process:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_yaml)
    return RunLog(out_dir, tensorboard)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
