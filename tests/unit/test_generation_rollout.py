"""rlhf.rollout pieces without services: the lag budget, the prompt mix, the bundled prompt
sets, and retries (against a real gRPC server that answers UNAVAILABLE, then succeeds)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from rlhf.rollout import EVAL, TRAIN, PolicyBudget, PromptMixer, WorkerConfig, build_prompt_sets, call_with_retry, load_prompts
from rlhf.rollout.worker import GroupDropped
from rlhf.v1 import generation_pb2, generation_pb2_grpc


def test_budget_allows_lag_plus_one_batches_per_version():
    b = PolicyBudget(rollouts_per_version=4, max_policy_lag=1)
    b.observe(0)
    granted = 0
    while b.try_reserve(2):
        b.settle(2, 2)
        granted += 2
    assert granted == 8 and b.remaining == 0
    assert not b.observe(0)              # the same version again changes nothing
    assert b.observe(3) and b.remaining == 8
    assert PolicyBudget(16, 0).budget == 16  # lag 0: one learner batch per version, on-policy


def test_budget_counts_reservations_in_flight():
    b = PolicyBudget(rollouts_per_version=2, max_policy_lag=0)
    assert b.try_reserve(2) and not b.try_reserve(2)
    b.settle(2, 0)                        # the group failed: its room comes back
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
            cfg = WorkerConfig(initial_backoff_s=0.01, max_backoff_s=0.05)
            try:
                result = await call_with_retry("get_info", stub.GetInfo, generation_pb2.GetInfoRequest(), 5, cfg,
                                               asyncio.Event())
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
