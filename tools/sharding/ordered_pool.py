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
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any

# Items per task: one task then holds ~25 ms of decoding (Pillow decodes a 500x375 JPEG in ~1.6 ms,
# DEPENDENCIES.md), so per-task inter-process overhead stays small.
CHUNK_SIZE = 16
# Chunks queued per worker: enough that no worker waits for the next one, few enough to bound memory.
CHUNKS_PER_WORKER = 3
# A chunk decodes in ~25 ms; one that has not come back after this long went to a hung or lost worker, which
# is then treated like a crashed one (a pool whose worker died can also leave a future that never resolves).
CHUNK_TIMEOUT_S = 300.0
# What a worker's death or hang looks like from here.
_LOST = (BrokenProcessPool, FutureTimeout)


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
        timeout_s: float = CHUNK_TIMEOUT_S,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.fn, self.workers, self.on_crash, self.chunk_size = fn, workers, on_crash, chunk_size
        self.timeout_s = timeout_s
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
                results = future.result(timeout=self.timeout_s)
            except _LOST:
                self._restart()
                results = self._isolate(chunk)
                # Every other queued chunk died with the pool: queue them again, in order.
                pending = deque((c, self._submit(c)) for c, _ in pending)
            yield from zip(chunk, results)

    def _submit(self, chunk: list) -> Future:
        if self._executor is None:
            # spawn: no fork of a process holding threads (tqdm's monitor) or open shard files.
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._executor.submit(_apply, self.fn, chunk)
        except BrokenProcessPool as exc:
            # A worker died while this chunk was being queued: hand back a failed future, so that map()
            # meets the crash in input order and restarts the pool, as for a chunk that was in flight.
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def _restart(self) -> None:
        """Kill every worker (a hung one would never exit) and drop the executor; the next submit starts anew."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        for process in list((executor._processes or {}).values()):  # no public API to reach the workers
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def _isolate(self, chunk: list) -> list:
        """Re-run a chunk one item at a time with nothing else in flight, so a crash names its item."""
        results = []
        for item in chunk:
            try:
                results.extend(self._submit([item]).result(timeout=self.timeout_s))
            except _LOST:
                self._restart()
                results.append(self.on_crash(item))
        return results
