"""rlhf.serving.batcher.MicroBatcher (shared by the reward and reference services):
concurrent requests share model calls, results go back to the right caller, a request is
never split, errors reach every caller of the failed batch, close() fails what is left."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rlhf.serving.batcher import BatcherClosed, MicroBatcher


class Recorder:
    """A stand-in model: doubles its inputs and records each call's batch."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(list(items))
        return [2 * x for x in items]


def test_concurrent_requests_are_coalesced_and_answered_in_order():
    async def main():
        model = Recorder()
        b = MicroBatcher(model, max_batch_items=64, max_wait_ms=20, name="t")
        reqs = [list(range(i * 10, i * 10 + 3)) for i in range(8)]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        await b.close()
        return model, reqs, results

    model, reqs, results = asyncio.run(main())
    assert results == [[2 * x for x in r] for r in reqs]
    assert len(model.calls) < len(reqs)  # shared calls
    assert sorted(x for call in model.calls for x in call) == sorted(x for r in reqs for x in r)


def test_batches_respect_the_item_limit_without_splitting_requests():
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        b = MicroBatcher(model, max_batch_items=5, max_wait_ms=0, name="t")
        first = asyncio.create_task(b.submit([0]))  # occupies the worker until the gate opens
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b.submit(r)) for r in ([1, 2, 3], [4, 5], [6], list(range(7, 17)))]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return model.calls, out

    calls, out = asyncio.run(main())
    assert out[4] == [2 * x for x in range(7, 17)]
    # [1,2,3] + [4,5] fill 5 items; [6] waits; the oversized request runs alone, whole
    assert calls == [[0], [1, 2, 3, 4, 5], [6], list(range(7, 17))]


def test_an_error_reaches_every_caller_of_the_batch_and_the_batcher_survives():
    async def main():
        def model(items):
            if -1 in items:
                raise ValueError("bad item")
            return items

        b = MicroBatcher(model, max_batch_items=8, max_wait_ms=20, name="t")
        r = await asyncio.gather(b.submit([1]), b.submit([-1]), return_exceptions=True)
        ok = await b.submit([3])
        await b.close()
        return r, ok

    r, ok = asyncio.run(main())
    assert all(isinstance(x, ValueError) for x in r) and ok == [3]


def test_wrong_result_count_is_an_error_not_a_misrouted_answer():
    async def main():
        b = MicroBatcher(lambda items: items[:-1], max_batch_items=8, name="t")
        try:
            with pytest.raises(RuntimeError, match="results for"):
                await b.submit([1, 2])
        finally:
            await b.close()

    asyncio.run(main())


def test_close_fails_queued_requests_and_refuses_new_ones():
    async def main():
        gate = threading.Event()
        b = MicroBatcher(Recorder(gate), max_batch_items=1, max_wait_ms=0, name="t")
        running = asyncio.create_task(b.submit([1]))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(b.submit([2]))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0.01)
        gate.set()
        await closing
        with pytest.raises(BatcherClosed):
            await b.submit([3])
        return await asyncio.gather(running, queued, return_exceptions=True)

    running, queued = asyncio.run(main())
    assert isinstance(queued, BatcherClosed)
    assert isinstance(running, BatcherClosed) or running == [2]


def test_cancelled_callers_are_skipped():
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        b = MicroBatcher(model, max_batch_items=8, max_wait_ms=0, name="t")
        first = asyncio.create_task(b.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.submit([2]))
        kept = asyncio.create_task(b.submit([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        out = await asyncio.gather(first, kept)
        await b.close()
        return model.calls, out

    calls, out = asyncio.run(main())
    assert out == [[2], [6]] and calls == [[1], [3]]
