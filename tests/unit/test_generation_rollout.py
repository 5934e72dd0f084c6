"""rlhf.rollout pieces without services: the lag budget, the prompt mix, the bundled prompt
sets, and retries (against a real gRPC server that answers UNAVAILABLE, then succeeds)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from rlhf.rollout import (
    EVAL,
    TRAIN,
    PolicyBudget,
    PromptMixer,
    WorkerConfig,
    build_prompt_sets,
    call_with_retry,
    load_prompts,
)
from rlhf.rollout.worker import GroupDropped
from rlhf.v1 import generation_pb2, generation_pb2_grpc


def _spend(b: PolicyBudget) -> int:
    granted = 0
    while b.try_reserve(2):
        b.settle(2, 2)
        granted += 2
    return granted


def test_budget_allows_lag_plus_one_batches_outstanding():
    b = PolicyBudget(rollouts_per_version=4, max_policy_lag=1)
    assert b.advance(0, counts=(0, 0)) and _spend(b) == 8 and b.remaining == 0
    # the learner trained one batch and announced a version: 4 are still ahead of anything new
    assert b.advance(1, counts=(4, 0)) and b.carried == 4 and _spend(b) == 4
    assert b.advance(2, counts=(12, 0)) and b.backlog == 0 and b.remaining == 8  # it caught up
    assert _spend(b) == 8 and b.advance(3) and b.remaining == 4  # no counts: one batch taken as consumed
    assert PolicyBudget(16, 0).budget == 16  # lag 0: one learner batch per version, on-policy


@pytest.mark.parametrize("with_counts", [True, False])
def test_a_worker_faster_than_the_learner_never_trains_a_rollout_past_the_lag(with_counts):
    """The worker makes all it may at once; the learner trains one batch (oldest first) per
    version. Outstanding rollouts stay within the budget, so none is ever stale; counting
    only what each announcement opened (the old rule) let the queue grow without bound."""
    per_version, lag = 4, 2
    b = PolicyBudget(per_version, lag)
    queue, version, trained, lags = [], 0, 0, []
    b.advance(version, counts=(0, 0) if with_counts else None)
    for _ in range(30):
        queue += [version] * _spend(b)
        assert len(queue) <= per_version * (lag + 1)
        batch, queue = queue[:per_version], queue[per_version:]
        lags += [version - v for v in batch]
        trained += len(batch)
        version += 1
        b.advance(version, counts=(trained, 0) if with_counts else None)
    assert max(lags) <= lag and trained == 30 * per_version


def test_budget_follows_the_learners_announcements_not_version_numbers():
    """Any announcement opens a budget, whatever its number: a bogus 999999 (or a generator
    serving one) cannot make the worker wait for the learner to catch up with it, and a
    rollback to an older version resumes the worker like any other announcement."""
    b = PolicyBudget(rollouts_per_version=2, max_policy_lag=0)
    assert b.advance(999999) and _spend(b) == 2
    assert b.advance(7) and b.version == 7 and _spend(b) == 2  # lower than 999999: still a new budget
    assert b.advance(4) and _spend(b) == 2  # a rollback to 4
    assert b.advance(4) and _spend(b) == 2  # the same number again: the learner moved on
    assert not b.advance(-1) and b.remaining == 0 and b.version == 4  # no learner announces a negative version
    assert b.announcements == 4


def test_budget_reopens_when_the_learner_drops_rollouts_and_cannot_make_a_batch():
    """After a rollback the learner drops the rollouts sampled before the generator swapped
    (stale) and waits for fresh ones; without a new version nothing would be announced."""
    b = PolicyBudget(rollouts_per_version=4, max_policy_lag=1)
    b.advance(5, counts=(100, 0))
    assert _spend(b) == 8
    assert not b.learner_counts(104, 0)  # trained a batch: its version is about to be announced
    assert not b.learner_counts(108, 0)  # no drops: only an announcement opens a budget
    assert b.remaining == 0 and b.releases == 0
    b.advance(1, counts=(108, 0))  # ROLLED_BACK 1
    assert _spend(b) == 8
    assert not b.learner_counts(108, 3)  # 3 stale dropped, 5 left: still a batch to make
    assert b.learner_counts(108, 6)  # 6 dropped, 2 left: less than a batch, so a new budget
    assert b.remaining == 6 and b.carried == 2 and b.releases == 1  # the 2 left are still ahead
    assert not b.learner_counts(50, 0)  # a learner restored from an older checkpoint: a new base


def test_budget_counts_reservations_in_flight():
    b = PolicyBudget(rollouts_per_version=2, max_policy_lag=0)
    assert b.try_reserve(2) and not b.try_reserve(2)
    b.settle(2, 0)  # the group failed: its room comes back
    assert b.try_reserve(2)


def test_mixer_takes_live_prompts_first_when_asked_and_cycles_the_set():
    records = [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    m = PromptMixer(records, live_fraction=1.0, seed=0)
    m.add_live("c1", [{"role": "user", "content": "live?"}])
    m.add_live("c2", [{"role": "assistant", "content": "not a prompt"}])  # ignored: no user turn last
    first = m.next()
    assert (first.prompt_id, first.source) == ("live:c1", "live")
    ids = [m.next().prompt_id for _ in range(6)]
    assert sorted(ids[:3]) == sorted(ids[3:]) == ["0", "1", "2"]
    with pytest.raises(ValueError):
        PromptMixer(records, live_fraction=1.5)


def test_bundled_prompt_sets_are_current_and_held_out():
    train, held_out = build_prompt_sets()
    assert load_prompts(TRAIN) == train and load_prompts(EVAL) == held_out, "run python -m rlhf.rollout.prompt_set"
    assert len(train) >= 250 and len(held_out) >= 80
    texts = lambda rs: {r["messages"][-1]["content"] for r in rs}  # noqa: E731
    assert not texts(train) & texts(held_out)
    assert len({r["category"] for r in held_out}) == 10
    assert all(r["messages"][-1]["role"] == "user" for r in train + held_out)
    json.dumps(train)


class _Flaky(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, failures: int, code: grpc.StatusCode):
        self.failures, self.code, self.calls = failures, code, 0

    async def GetInfo(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, "not now")
        return generation_pb2.GeneratorInfo(policy_version=7)


async def _call(failures: int, code: grpc.StatusCode) -> tuple[object, int]:
    server = grpc.aio.server()
    servicer = _Flaky(failures, code)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        # a plain channel: the retries under test are the worker's, not the channel's
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            cfg = WorkerConfig(initial_backoff_seconds=0.01, max_backoff_seconds=0.05)
            try:
                result = await call_with_retry(
                    "get_info", stub.GetInfo, generation_pb2.GetInfoRequest(), 5, cfg, asyncio.Event()
                )
            except GroupDropped as e:
                result = e
        return result, servicer.calls
    finally:
        await server.stop(None)


def test_retries_unavailable_with_backoff():
    result, calls = asyncio.run(_call(3, grpc.StatusCode.UNAVAILABLE))
    assert result.policy_version == 7 and calls == 4


def test_other_errors_are_not_retried():
    result, calls = asyncio.run(_call(1, grpc.StatusCode.INVALID_ARGUMENT))
    assert isinstance(result, GroupDropped) and "INVALID_ARGUMENT" in str(result) and calls == 1


def test_retries_log_one_line_each(caplog):
    with caplog.at_level("WARNING", logger="rlhf.rollout.worker"):
        result, calls = asyncio.run(_call(2, grpc.StatusCode.UNAVAILABLE))
    retries = [r for r in caplog.records if r.getMessage() == "service unavailable, retrying"]
    assert result.policy_version == 7 and calls == 3
    assert [(r.stage, r.attempt) for r in retries] == [("get_info", 1), ("get_info", 2)]


def test_retry_wait_doubles_with_jitter_up_to_the_max():
    import tenacity

    from rlhf.rollout.worker import retry_wait

    wait = retry_wait(WorkerConfig(initial_backoff_seconds=0.5, max_backoff_seconds=4.0))
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    for attempt, backoff in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        state.attempt_number = attempt
        waits = [wait(state) for _ in range(200)]
        assert all(backoff / 2 <= w <= backoff for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > backoff / 10  # jittered, not a constant
