"""Progress bar for make_shards: files/s from tqdm, input MB/s and kept/skipped counts in the postfix."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

POSTFIX_EVERY_S = 0.5  # tqdm redraws at most 10 times a second; formatting the postfix per file would cost more


class Progress:
    def __init__(self, enabled: bool):
        self._bar = tqdm(unit=" files", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self._start = self._last_postfix = time.perf_counter()
        self.source_bytes = 0
        self.kept = 0
        self.skipped = 0

    def update(self, kept: bool, source_bytes: int) -> None:
        self.source_bytes += source_bytes
        if kept:
            self.kept += 1
        else:
            self.skipped += 1
        self._bar.update(1)
        now = time.perf_counter()
        if now - self._last_postfix >= POSTFIX_EVERY_S:
            self._last_postfix = now
            self._set_postfix(now)

    def close(self) -> None:
        self._set_postfix(time.perf_counter())
        self._bar.close()

    def _set_postfix(self, now: float) -> None:
        mb_s = self.source_bytes / 1e6 / max(now - self._start, 1e-9)
        self._bar.set_postfix_str(f"{mb_s:.1f} MB/s in, kept {self.kept}, skipped {self.skipped}", refresh=False)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start
