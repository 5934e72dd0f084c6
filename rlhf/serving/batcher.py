"""A micro-batcher: concurrent RPCs share one model forward.

    batcher = MicroBatcher(score_fn, max_batch_items=64, max_wait_ms=2, name="reward")
    results = await batcher.submit(items)     # in each RPC handler

`score_fn(items) -> results` (same length, same order) runs on one worker thread, so
the event loop stays free and the model sees one batch at a time. While a batch runs,
new requests queue; the next batch takes as many whole requests as fit in
`max_batch_items` (a request is never split, so one request is answered by one model
version; a request larger than the limit runs alone). With nothing running, the first
request waits at most `max_wait_ms` for company.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

from prometheus_client import Counter, Histogram

from rlhf.errors import Internal, Unavailable

T = TypeVar("T")
R = TypeVar("R")

BATCH_ITEMS = Histogram(
    "rlhf_batcher_batch_items",
    "Items per model call of a micro-batcher",
    ["name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_REQUESTS = Histogram(
    "rlhf_batcher_batch_requests",
    "Requests coalesced into one model call",
    ["name"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
QUEUE_SECONDS = Histogram(
    "rlhf_batcher_queue_seconds",
    "Time a request waits before its batch starts",
    ["name"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FAILED = Counter("rlhf_batcher_failed_batches_total", "Model calls that raised", ["name"])


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class _Pending(Generic[T, R]):
    __slots__ = ("items", "future", "enqueued")

    def __init__(self, items: Sequence[T], future: asyncio.Future):
        self.items, self.future, self.enqueued = items, future, time.perf_counter()


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch_items: int = 64,
        max_wait_ms: float = 2.0,
        name: str = "batcher",
    ):
        if max_batch_items < 1:
            raise ValueError(f"max_batch_items must be >= 1, got {max_batch_items}")
        self.fn, self.max_batch_items, self.max_wait_s, self.name = fn, max_batch_items, max_wait_ms / 1000, name
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-batch")
        self._closed = False

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for `items`, computed in a batch with whatever else is queued."""
        if self._closed:
            raise BatcherClosed(f"{self.name} batcher is closed")
        if not items:
            return []
        if self._runner is None:
            self._wakeup = asyncio.Event()
            self._runner = asyncio.create_task(self._run(), name=f"{self.name}-batcher")
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                # with nothing in flight, give concurrent callers a moment to arrive
                if self.max_wait_s > 0 and self._queued_items() < self.max_batch_items:
                    await asyncio.sleep(self.max_wait_s)
                batch = self._take()
                if not batch:
                    continue
                flat = [x for p in batch for x in p.items]
                now = time.perf_counter()
                for p in batch:
                    QUEUE_SECONDS.labels(self.name).observe(now - p.enqueued)
                BATCH_ITEMS.labels(self.name).observe(len(flat))
                BATCH_REQUESTS.labels(self.name).observe(len(batch))
                try:
                    results = await loop.run_in_executor(self._executor, self.fn, flat)
                    if len(results) != len(flat):
                        raise RuntimeError(f"{self.name}: {len(results)} results for {len(flat)} items")
                except asyncio.CancelledError:  # close() while a batch runs
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(BatcherClosed(f"{self.name} batcher is closed"))
                    raise
                except Exception as e:  # noqa: BLE001 - every caller of this batch gets the error
                    FAILED.labels(self.name).inc()
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                i = 0
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(list(results[i : i + len(p.items)]))
                    i += len(p.items)

    def _queued_items(self) -> int:
        return sum(len(p.items) for p in self._queue)

    def _take(self) -> list[_Pending[T, R]]:
        """Whole requests, oldest first, up to max_batch_items (at least one); cancelled ones dropped."""
        batch, total = [], 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # the caller went away (cancelled / deadline)
                self._queue.popleft()
                continue
            if batch and total + len(p.items) > self.max_batch_items:
                break
            batch.append(self._queue.popleft())
            total += len(p.items)
        return batch

    async def close(self) -> None:
        """Fail what is still queued, stop the runner, release the worker thread."""
        self._closed = True
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed(f"{self.name} batcher is closed"))
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)


async def submit_or_raise(batcher: "MicroBatcher", items: Sequence, service: str, what: str) -> list:
    """`batcher.submit(items)` for a gRPC handler: a closing batcher raises Unavailable
    (the client retries another replica), any other failure Internal with a message and
    the trace in our log, never in the client's."""
    try:
        return await batcher.submit(items)
    except BatcherClosed:
        raise Unavailable(f"{service} service is shutting down; retry another replica") from None
    except Exception:
        logging.getLogger(f"services.{service}").exception("%s failed", what)
        raise Internal(f"{what} failed; the {service} service log has the cause") from None
