"""Run a function over a stream of items in worker processes; results come back in input order.

Unlike multiprocessing.Pool.imap, which drains its whole input iterator into the task queue, at most
`workers * CHUNKS_PER_WORKER` chunks are in flight, so a 100M-line list is read only as fast as it is processed.
A worker that dies (a decoder crash, the OOM killer) costs only the item that killed it: the pool is restarted
and that chunk re-run one item at a time to find the culprit, which gets `on_crash(item)` as its result.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any

# Items per task: one task then holds ~25 ms of decoding (Pillow decodes a 500x375 JPEG in ~1.6 ms,
# DEPENDENCIES.md), so per-task inter-process overhead stays small.
CHUNK_SIZE = 16
# Chunks queued per worker: enough that no worker waits for the next one, few enough to bound memory.
CHUNKS_PER_WORKER = 3


def _apply(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]


class OrderedPool:
    """workers=0 runs everything in this process (no crash isolation); workers>=1 uses spawned processes."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int,
        on_crash: Callable[[Any], Any],
        chunk_size: int = CHUNK_SIZE,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.fn, self.workers, self.on_crash, self.chunk_size = fn, workers, on_crash, chunk_size
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, items: Iterable) -> Iterator[tuple[Any, Any]]:
        """Yields (item, fn(item)) in input order."""
        if self.workers == 0:
            for item in items:
                yield item, self.fn(item)
            return
        items = iter(items)
        window = self.workers * CHUNKS_PER_WORKER
        pending: deque[tuple[list, Future]] = deque()
        while True:
            while len(pending) < window:
                chunk = list(islice(items, self.chunk_size))
                if not chunk:
                    break
                pending.append((chunk, self._submit(chunk)))
            if not pending:
                return
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                self._restart()
                results = self._isolate(chunk)
                # Every other queued chunk died with the pool: queue them again, in order.
                pending = deque((c, self._submit(c)) for c, _ in pending)
            yield from zip(chunk, results)

    def _submit(self, chunk: list) -> Future:
        if self._executor is None:
            # spawn: no fork of a process holding threads (tqdm's monitor) or open shard files.
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._executor.submit(_apply, self.fn, chunk)

    def _restart(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    def _isolate(self, chunk: list) -> list:
        """Re-run a chunk one item at a time with nothing else in flight, so a crash names its item."""
        results = []
        for item in chunk:
            try:
                results.extend(self._submit([item]).result())
            except BrokenProcessPool:
                self._restart()
                results.append(self.on_crash(item))
        return results
