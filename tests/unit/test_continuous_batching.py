"""Continuous batching in the transformers backend (rlhf/generation/batching.py), driven
in-process on the tiny random model: requests that join a running batch get what they get
alone (greedy tokens, raw log-probs, seeded samples, penalties, top log-probs), whatever
their prompt length against the running rows; a cancelled request frees its slot at once;
static batching admits nobody into a running batch; a weight swap is not starved by a
steady stream of requests, and every request reports the version that produced it.
Pre-emption: a rollout parked while chats decode resumes with exactly what it gets alone,
the chats decode without it, and the starvation bound brings it back (or in, when it arrived meanwhile).

Log-probs are compared to ABS_TOL, as in tests/integration/test_generation_service.py:
another batch shape reorders float sums (measured ≈ 1e-6 in fp32)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.generation import Generator, Limits, SampleOut, Sampling
from rlhf.generation.batching import STATIC, Job, admit
from rlhf.generation.hf_backend import TransformersBackend
from rlhf.generation.weights import FULL, WeightUpdate
from rlhf.models import build_tiny_model, load_causal_lm, sequence_logprobs
from rlhf.priorities import BACKGROUND, INTERACTIVE
from rlhf.weightstore import WeightStore
from tests.procs import wait_for

ABS_TOL = 1e-4
GREEDY = dict(temperature=0.0, ignore_eos=True)
SHORT_PROMPT = [7, 8]  # shorter than the running row when it joins
LONG_PROMPT = list(range(300, 360))  # longer than the running row when it joins
RUNNING_PROMPT = [1, 2, 3, 4, 5]


class Recording(TransformersBackend):
    """The backend, recording the priorities of the rows each decode step ran: what the
    engine decoded together, seen from inside."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps: list[tuple[int, ...]] = []

    def _draw(self, batch, logits):
        self.steps.append(tuple(r.job.sampling.priority for r in batch.rows))
        super()._draw(batch, logits)


def with_backend(model_dir: Path, body, cls=TransformersBackend, **kw):
    async def main():
        backend = cls(model_dir, batch_wait_ms=1, **kw)
        await backend.start()
        try:
            return await body(backend)
        finally:
            await backend.stop()

    return asyncio.run(main())


async def collect(backend, ids: list[int], s: Sampling, first: asyncio.Event | None = None, stream: bool = True):
    outs = [SampleOut(i) for i in range(s.n)]
    async with aclosing(backend.generate(ids, s, "t", None, stream)) as deltas:
        async for d in deltas:
            outs[d.index].add(d)
            if first is not None:
                first.set()
    return outs


async def poll(predicate, what: str, timeout: float = 120):
    """tests/procs.wait_for, off the event loop so the backend keeps running."""
    return await asyncio.to_thread(wait_for, predicate, timeout, what, 0.01)


def assert_same(joined: SampleOut, alone: SampleOut) -> None:
    assert joined.token_ids == alone.token_ids and joined.finish_reason == alone.finish_reason
    assert joined.text == alone.text
    worst = (torch.tensor(joined.logprobs) - torch.tensor(alone.logprobs)).abs().max().item()
    assert worst < ABS_TOL, f"log-probs differ by {worst:.2e}"
    assert [[t for t, _ in step] for step in joined.top] == [[t for t, _ in step] for step in alone.top]


async def alone_then_joined(backend, running: tuple[list[int], Sampling], joiners: list[tuple[list[int], Sampling]]):
    """Each request alone, then the joiners sent while `running` decodes. Fails unless the
    running request is still decoding when the joiners have finished (they joined mid-batch)."""
    alone = [await collect(backend, ids, s) for ids, s in [running, *joiners]]
    first = asyncio.Event()
    task = asyncio.create_task(collect(backend, *running, first=first))
    await first.wait()
    joined = await asyncio.gather(*(collect(backend, ids, s, stream=i % 2 == 0) for i, (ids, s) in enumerate(joiners)))
    assert not task.done(), "the running request ended before the joiners: make it longer"
    return alone, [await task, *joined]


# --- admission rule (no model) ---------------------------------------------------------------


def job(n: int = 1, priority: int = 0, prompt: int = 10) -> Job:
    return Job([1] * prompt, Sampling(n=n, priority=priority), loop=None)


def test_admission_priority_capacity_and_prefill_budget():
    a, b, c, d = job(priority=10), job(n=2, priority=10), job(priority=0), job(n=3)
    pending = [a, b, c, d]
    # priority 0 first (c, d in arrival order), then 10; 1 + 3 + 1 rows fit in 6 slots, b's 2 do not,
    # and nothing behind b overtakes it
    assert admit(pending, running=1, max_batch=6, batching="continuous", prefill_token_budget=1000) == [c, d, a]
    assert pending == [b]
    # static: a running batch takes nobody; an empty one fills up
    assert admit(pending, running=1, max_batch=6, batching=STATIC, prefill_token_budget=1) == []
    assert admit(pending, running=0, max_batch=6, batching=STATIC, prefill_token_budget=1) == [b]
    # the prefill budget: prompts of 10 + 10 fit in 25, a third waits for the next step
    pending = [job(), job(), job()]
    assert len(admit(pending, running=4, max_batch=32, batching="continuous", prefill_token_budget=25)) == 2
    # a prompt longer than the budget joins alone in its step
    pending = [job(prompt=100), job()]
    assert len(admit(pending, running=4, max_batch=32, batching="continuous", prefill_token_budget=25)) == 1
    assert len(pending) == 1
    # cancelled jobs are dropped, not admitted
    gone = job()
    gone.cancelled = True
    live = job()
    pending = [gone, live]
    assert admit(pending, running=0, max_batch=1, batching="continuous", prefill_token_budget=25) == [live]
    # pre-emption: with interactive work present only jobs below the cutoff join, even into an empty batch
    chat, rollout = job(priority=0), job(priority=10)
    pending = [rollout, chat]
    assert admit(pending, running=0, max_batch=8, batching="continuous", prefill_token_budget=99, below=10) == [chat]
    assert admit(pending, running=0, max_batch=8, batching="continuous", prefill_token_budget=99, below=10) == []
    assert pending == [rollout]
    # ... until a background job has waited max_wait: then it is overdue and goes first, ahead
    # of the chats queued after it (aging), and a fresh one still waits
    chat, fresh = job(priority=0), job(priority=10)
    rollout.queued_at -= 5.0
    pending = [rollout, fresh, chat]
    kw = dict(batching="continuous", prefill_token_budget=99, below=10, max_wait=4.0)
    assert admit(pending, running=0, max_batch=8, **kw) == [rollout, chat]
    assert rollout.overdue and not fresh.overdue and pending == [fresh]
    # an overdue group of 4 that does not fit holds back the chat behind it, so the slots
    # the chats free go to it and not to newer chats
    group, chat = job(n=4, priority=10), job(priority=0)
    group.queued_at -= 5.0
    pending = [group, chat]
    assert admit(pending, running=6, max_batch=8, **kw) == []
    assert admit(pending, running=4, max_batch=8, **kw) == [group]
    assert pending == [chat]


# --- joining a running batch -----------------------------------------------------------------


def test_requests_joining_mid_batch_get_what_they_get_alone(tiny_model_dir):
    """Greedy joiners with a shorter and a longer prompt than the running row (so each side
    is left-padded in turn), one streamed and one not; the running row must not change
    either."""
    running = (RUNNING_PROMPT, Sampling(max_tokens=120, **GREEDY))
    joiners = [(SHORT_PROMPT, Sampling(max_tokens=16, **GREEDY)), (LONG_PROMPT, Sampling(max_tokens=16, **GREEDY))]
    alone, joined = with_backend(tiny_model_dir, lambda b: alone_then_joined(b, running, joiners), max_batch=8)
    for a, j in zip(alone, joined):
        assert_same(j[0], a[0])
    assert [len(j[0].token_ids) for j in joined] == [120, 16, 16]


def test_penalties_logit_bias_and_top_logprobs_join_exactly(tiny_model_dir):
    """`Penalties` (rlhf/generation/batching.py) grow and shrink with the rows: a penalised request joins a batch that
    has none, a plain one joins beside it, and top log-probs are reported per row."""
    running = (RUNNING_PROMPT, Sampling(max_tokens=80, top_logprobs=2, **GREEDY))
    joiners = [
        (SHORT_PROMPT, Sampling(max_tokens=20, frequency_penalty=1.5, logit_bias=((42, 5.0),), **GREEDY)),
        (LONG_PROMPT, Sampling(max_tokens=12, top_logprobs=4, presence_penalty=-1.0, **GREEDY)),
        (SHORT_PROMPT, Sampling(max_tokens=10, **GREEDY)),
    ]
    alone, joined = with_backend(tiny_model_dir, lambda b: alone_then_joined(b, running, joiners), max_batch=8)
    for a, j in zip(alone, joined):
        assert_same(j[0], a[0])
    assert 42 in joined[1][0].token_ids  # the bias took effect
    assert len(joined[2][0].top[0]) == 4 and joined[0][0].top and not joined[3][0].top


def test_seeded_samples_joining_equal_the_same_request_alone(tiny_model_dir):
    running = (RUNNING_PROMPT, Sampling(n=2, temperature=1.0, seed=5, max_tokens=80, ignore_eos=True))
    joiners = [
        (SHORT_PROMPT, Sampling(n=3, temperature=0.9, top_p=0.8, seed=11, max_tokens=16)),
        (LONG_PROMPT, Sampling(n=1, temperature=1.2, seed=12, max_tokens=16, stop=("e",))),
    ]
    alone, joined = with_backend(tiny_model_dir, lambda b: alone_then_joined(b, running, joiners), max_batch=8)
    for a, j in zip(alone, joined):
        for x, y in zip(a, j):
            assert_same(y, x)
    assert len({tuple(s.token_ids) for s in joined[1]}) == 3  # the n samples still differ


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(tiny_model_dir):
    """max_batch=2, both slots taken by endless requests: a third waits. Closing one of the
    two lets it run to its end while the other keeps decoding."""

    async def body(backend):
        endless = Sampling(max_tokens=5000, **GREEDY)
        firsts = [asyncio.Event(), asyncio.Event()]
        kept = asyncio.create_task(collect(backend, RUNNING_PROMPT, endless, first=firsts[0]))
        await firsts[0].wait()
        gen = backend.generate(SHORT_PROMPT, endless, "cancelled", None)
        await gen.__anext__()  # decoding: the batch is full now
        waiting = asyncio.create_task(collect(backend, LONG_PROMPT, Sampling(max_tokens=12, **GREEDY)))
        await poll(lambda: backend._pending, "the third request queued")
        assert not waiting.done(), "a third request ran in a full batch"
        await gen.aclose()  # the caller goes away: its row leaves at the next step
        out = await asyncio.wait_for(waiting, timeout=120)
        assert not kept.done(), "the remaining request ended: it should still be decoding"
        kept.cancel()
        with pytest.raises(asyncio.CancelledError):
            await kept
        return out

    out = with_backend(tiny_model_dir, body, max_batch=2)
    assert len(out[0].token_ids) == 12 and out[0].finish_reason == "length"


def test_static_batching_admits_nobody_into_a_running_batch(tiny_model_dir):
    async def body(backend):
        first = asyncio.Event()
        running = asyncio.create_task(collect(backend, RUNNING_PROMPT, Sampling(max_tokens=60, **GREEDY), first=first))
        await first.wait()
        late = await collect(backend, SHORT_PROMPT, Sampling(max_tokens=4, **GREEDY))
        assert running.done(), "the late request ran before the batch in flight ended"
        return late

    assert len(with_backend(tiny_model_dir, body, max_batch=8, batching="static")[0].token_ids) == 4


# --- weight swaps --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    # wider init than the base, so greedy output and log-probs visibly differ
    return build_tiny_model(tmp_path_factory.mktemp("cb-other") / "other", seed=1, initializer_range=0.2)


def test_a_swap_falls_between_batches_and_is_not_starved(tiny_model_dir, other_model):
    """Driven directly (no generator drain): four clients keep three slots busy with
    requests back to back. A swap queued meanwhile stops admissions, waits for the rows
    running then and happens; a request sent while it waits decodes under the new weights,
    and every other one comes whole from one of the two."""
    models = [load_causal_lm(tiny_model_dir), load_causal_lm(other_model)]
    s = Sampling(max_tokens=24, **GREEDY)

    async def body(backend):
        swapped, results = asyncio.Event(), []

        async def client(i: int):
            while not swapped.is_set():
                ids = [10 + i, 20 + i, 30]
                results.append((ids, (await collect(backend, ids, s))[0]))

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        await poll(lambda: len(results) >= 4, "requests before the swap")
        prepared = await backend.prepare(WeightUpdate(1, FULL, [other_model / "model.safetensors"]))
        swap = asyncio.create_task(backend.activate(prepared))
        await poll(lambda: backend._swaps_waiting, "the swap queued")
        late_ids = [99, 98, 97]
        late = asyncio.create_task(collect(backend, late_ids, s))
        await asyncio.wait_for(swap, timeout=120)  # a starved swap would never end
        swapped.set()
        await asyncio.gather(*clients)
        return results, (late_ids, (await late)[0])

    results, (late_ids, late) = with_backend(tiny_model_dir, body, max_batch=3)

    def error(model, ids, out) -> float:
        return (sequence_logprobs(model, ids, out.token_ids) - torch.tensor(out.logprobs)).abs().max().item()

    assert error(models[1], late_ids, late) < ABS_TOL
    for ids, out in results:
        assert min(error(m, ids, out) for m in models) < ABS_TOL


def test_swaps_under_continuous_load_fail_nothing_and_report_the_right_version(tiny_model_dir, other_model, tmp_path):
    """The generator (drained swaps) over the continuous backend: clients with mixed
    lengths and priorities send back to back while the weights go 0 → 1 → 0; every request
    succeeds and its log-probs are those of the version it reports."""
    store = WeightStore(tmp_path / "weights")
    store.put(1, load_file(str(other_model / "model.safetensors")), meta={"promoted": True})
    models = {0: load_causal_lm(tiny_model_dir), 1: load_causal_lm(other_model)}

    async def body():
        gen = Generator(
            TransformersBackend(tiny_model_dir, max_batch=4, batch_wait_ms=1),
            tiny_model_dir,
            Limits(max_model_len=256),
            tmp_path / "weights",
            tmp_path / "work",
        )
        await gen.start()
        done, results = asyncio.Event(), []

        async def client(i: int):
            ids = list(range(5, 5 + 3 * (i + 1)))  # prompts of 3 … 18 tokens
            s = Sampling(temperature=1.0, seed=i, max_tokens=8 + 6 * i, priority=10 * (i % 2))
            while not done.is_set():
                outs, version = [SampleOut(0)], -1
                async with aclosing(gen.generate(ids, s, f"c{i}")) as stream:
                    async for chunk_version, d in stream:
                        version = chunk_version
                        outs[d.index].add(d)
                results.append((ids, version, outs[0]))

        try:
            clients = [asyncio.create_task(client(i)) for i in range(6)]
            await poll(lambda: len(results) >= 6, "requests on version 0")
            await asyncio.wait_for(gen.load_version(1), timeout=120)
            n1 = len(results)
            await poll(lambda: len(results) >= n1 + 6, "requests on version 1")
            await asyncio.wait_for(gen.load_version(0), timeout=120)
            n0 = len(results)
            await poll(lambda: len(results) >= n0 + 6, "requests back on version 0")
            done.set()
            await asyncio.gather(*clients)  # raises if a request failed
        finally:
            await gen.stop()
        return results

    results = asyncio.run(body())
    assert {v for _, v, _ in results} == {0, 1}
    for ids, version, out in results:
        ref = sequence_logprobs(models[version], ids, out.token_ids)
        worst = (ref - torch.tensor(out.logprobs)).abs().max().item()
        assert worst < ABS_TOL, f"a version-{version} response is not that version's ({worst:.2e})"


# --- pre-emption -----------------------------------------------------------------------------


def mixed(steps: list[tuple[int, ...]]) -> list[int]:
    """Indices of the decode steps that ran a chat and a rollout row together."""
    return [i for i, p in enumerate(steps) if INTERACTIVE in p and BACKGROUND in p]


@pytest.mark.parametrize("preemption", [True, False])
def test_a_parked_rollout_resumes_exactly_while_chats_decode_alone(tiny_model_dir, preemption):
    """A greedy rollout (penalised, with top log-probs) decodes; two chats arrive. With
    pre-emption the rollout is parked, no decode step runs it beside a chat, and it resumes
    afterwards with the tokens and log-probs it gets alone; without, they decode side by side
    (today's continuous batching), with the same outputs."""
    rollout = Sampling(max_tokens=120, priority=BACKGROUND, top_logprobs=2, frequency_penalty=0.5, **GREEDY)
    running = (RUNNING_PROMPT, rollout)
    joiners = [(SHORT_PROMPT, Sampling(max_tokens=16, **GREEDY)), (LONG_PROMPT, Sampling(max_tokens=12, **GREEDY))]

    async def body(backend):
        out = await alone_then_joined(backend, running, joiners)
        return out, backend.steps

    (alone, joined), steps = with_backend(tiny_model_dir, body, cls=Recording, max_batch=8, preemption=preemption)
    for a, j in zip(alone, joined):
        assert_same(j[0], a[0])
    chat_steps = [i for i, p in enumerate(steps) if INTERACTIVE in p]
    if preemption:
        assert not mixed(steps), "a chat decoded beside a rollout row"
        last_chat = chat_steps[-1]
        assert any(BACKGROUND in p for p in steps[last_chat + 1 :]), "the rollout did not resume after the chats"
    else:
        assert mixed(steps), "without pre-emption the chats decode beside the rollout"


def test_parked_seeded_samples_keep_their_streams_and_a_cancelled_one_leaves(tiny_model_dir):
    """A seeded n=2 rollout with a logit bias is parked under a chat and resumes with the same
    samples as alone (each row's generator and penalty counts travel with it); a second
    rollout cancelled while parked leaves for good: no later step runs it."""
    rollout = Sampling(
        n=2, temperature=1.0, seed=5, max_tokens=60, ignore_eos=True, priority=BACKGROUND, logit_bias=((42, 2.0),)
    )
    doomed = Sampling(max_tokens=5000, priority=BACKGROUND + 1, **GREEDY)
    chat = Sampling(n=1, temperature=0.8, seed=3, max_tokens=16)

    async def body(backend):
        alone = await collect(backend, RUNNING_PROMPT, rollout)
        first, doomed_first = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(collect(backend, RUNNING_PROMPT, rollout, first=first))
        gen = backend.generate(LONG_PROMPT, doomed, "doomed", None)
        await gen.__anext__()
        await first.wait()
        chat_task = asyncio.create_task(collect(backend, SHORT_PROMPT, chat, first=doomed_first))
        await doomed_first.wait()  # the chat decodes: both rollouts are parked now
        await gen.aclose()  # the doomed rollout's caller goes away while it is parked
        cancelled_at = len(backend.steps)
        await chat_task
        resumed = await task
        return alone, resumed, backend.steps, cancelled_at

    alone, resumed, steps, cancelled_at = with_backend(tiny_model_dir, body, cls=Recording, max_batch=8)
    for a, r in zip(alone, resumed):
        assert_same(r, a)
    assert len({tuple(s.token_ids) for s in resumed}) == 2  # the two samples still differ
    assert not mixed(steps)
    assert not any(BACKGROUND + 1 in p for p in steps[cancelled_at + 1 :]), "the cancelled rollout ran again"


@pytest.mark.parametrize("rollout_arrives", ["before the chat", "while the chat decodes"])
def test_the_starvation_bound_brings_a_rollout_in_beside_an_endless_chat(tiny_model_dir, rollout_arrives):
    """An endless chat would keep a rollout out for ever: parked, if it was decoding when the
    chat came, or queued, if it arrives while the chat decodes (a queued rollout is never
    admitted while interactive work is present, so the parked-rows bound alone would never
    apply to it). After preempt_max_wait_seconds parked or queued it decodes beside the chat
    to its end, never parked again, with what it gets alone, while the chat goes on."""
    rollout = Sampling(max_tokens=40, priority=BACKGROUND, **GREEDY)
    endless = Sampling(max_tokens=5000, **GREEDY)
    first_parked = rollout_arrives == "before the chat"

    async def body(backend):
        alone = (await collect(backend, RUNNING_PROMPT, rollout))[0]
        backend.steps.clear()
        if first_parked:
            first = asyncio.Event()
            task = asyncio.create_task(collect(backend, RUNNING_PROMPT, rollout, first=first))
            await first.wait()
        chat = backend.generate(SHORT_PROMPT, endless, "endless", None)
        await chat.__anext__()
        if not first_parked:
            backend.steps.clear()  # from the chat's first step on
            task = asyncio.create_task(collect(backend, RUNNING_PROMPT, rollout))
        done = (await asyncio.wait_for(task, timeout=120))[0]  # kept out for ever: times out
        await chat.__anext__()  # the chat still decodes
        await chat.aclose()
        return alone, done, list(backend.steps)

    alone, done, steps = with_backend(tiny_model_dir, body, cls=Recording, max_batch=8, preempt_max_wait_seconds=0.5)
    assert_same(done, alone)
    together = mixed(steps)
    assert together, "the rollout never decoded beside the chat"
    alone_chat = [i for i, p in enumerate(steps) if p == (INTERACTIVE,)]
    assert alone_chat and alone_chat[0] < together[0], "the rollout was not kept out first"
    rollout_steps = [i for i, p in enumerate(steps) if BACKGROUND in p and i >= together[0]]
    assert rollout_steps == list(range(together[0], together[0] + len(rollout_steps))), "parked again after the bound"
