"""The rollout worker from its real entrypoint, against the real broker and the real
generator (transformers backend), reward and reference services, all on tiny models.

Reward gate under test: no rollout before the reward model has trained on min_rm_examples
(here 4) feedback examples and serves a trained version.

Budget under test: rollouts_per_version=4, max_policy_lag=1 (the numbers a learner announces in
its PolicyUpdates; here the test plays the learner) → 8 rollouts outstanding at most, then the
worker holds back until the learner announces a version on rlhf.policy-updates (the generator
serving a newer version does not move it: only the learner's word does). No learner answers
GetStatus here, so each announcement counts as one batch (4) consumed: 4 more per announcement,
since the other 4 of the first budget are still ahead (the backlog, rlhf/rollout/budget.py).
"""

from __future__ import annotations

import math
import time
import urllib.request
import uuid

import pytest
import torch
from safetensors.torch import load_file

from rlhf.bus import EventConsumer, EventProducer, Topics, ensure_topics, new_event
from rlhf.models import build_tiny_model, load_causal_lm, sequence_logprobs
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc, reward_pb2, reward_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

BUDGET = 8
PER_VERSION = 4
THREADS = {"RLHF_TORCH_THREADS": "1", "RLHF_REFERENCE_TORCH_THREADS": "1", "RLHF_REWARD_TORCH_THREADS": "1"}
TOKEN = "rollout-test-token"


def metric(svc, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return math.nan


def comparisons(n: int) -> list[events_pb2.Feedback]:
    return [
        new_event(
            events_pb2.Feedback,
            conversation_id=f"f{i}",
            source="simulated",
            prompt=[common_pb2.ChatMessage(role="user", content=f"Question {i}?")],
            comparison=events_pb2.Comparison(chosen="Short.", rejected="A much longer answer " * 3),
        )
        for i in range(n)
    ]


def test_rollouts_are_consistent_and_the_worker_holds_back_at_max_policy_lag(tmp_path, broker, tiny_model_dir):
    topics = Topics(f"test-rollout-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, topics.all())
    store = WeightStore(tmp_path / "weights")
    other = build_tiny_model(tmp_path / "other", seed=1, initializer_range=0.2)
    v1 = store.put(1, load_file(str(other / "model.safetensors")), meta={"promoted": True})
    bus = {"RLHF_KAFKA_BOOTSTRAP": broker.bootstrap, "RLHF_TOPIC_PREFIX": topics.prefix, **THREADS}
    live_question = "What is a live prompt?"
    with EventProducer(broker.bootstrap) as producer:
        producer.publish(
            topics.interactions,
            new_event(
                events_pb2.Interaction,
                conversation_id="c1",
                prompt=[common_pb2.ChatMessage(role="user", content=live_question)],
            ),
            key="c1",
        )
        # what a learner with batch_size × publish_every = 4 and max_policy_lag = 1 announces at start-up
        producer.publish(
            topics.policy_updates,
            new_event(
                events_pb2.PolicyUpdate,
                version=0,
                action=events_pb2.POLICY_ACTION_PROMOTED,
                rollouts_per_version=4,
                max_policy_lag=1,
                temperature=1.0,
            ),
            key="policy",
        )

    with (
        run_service(
            "reward",
            tmp_path,
            env={
                **bus,
                "RLHF_REWARD_BACKBONE": "tiny",
                "RLHF_REWARD_MAX_TOKENS": "64",
                "RLHF_REWARD_TRAIN_BATCH_SIZE": "2",
                "RLHF_REWARD_PUBLISH_EVERY_STEPS": "1",
            },
        ) as rm,
        run_service("reference", tmp_path, env={**bus, "RLHF_MODEL": str(tiny_model_dir)}) as ref,
        run_service(
            "generator",
            tmp_path,
            env={
                **bus,
                "RLHF_MODEL": str(tiny_model_dir),
                "RLHF_BACKEND": "transformers",
                "RLHF_WEIGHT_STORE": str(store.root),
                "RLHF_CONTROL_TOKEN": TOKEN,
            },
        ) as gen,
        run_service(
            "rollout",
            tmp_path,
            env={
                **bus,
                "RLHF_GENERATOR_ADDR": gen.address,
                "RLHF_REWARD_ADDR": rm.address,
                "RLHF_REFERENCE_ADDR": ref.address,
                "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": "2",
                "RLHF_ROLLOUT_MAX_TOKENS": "8",
                "RLHF_LIVE_FRACTION": "1.0",
                "RLHF_ROLLOUT_CONCURRENCY": "2",
                "RLHF_ROLLOUT_VERSION_POLL_SECONDS": "0.3",
                "RLHF_ROLLOUT_MIN_RM_EXAMPLES": "4",
                "RLHF_LEARNER_ADDR": "",
            },
        ) as worker,
        EventConsumer(broker.bootstrap, topics.rollouts, events_pb2.Rollout, group_id="test") as consumer,
        sync_channel(gen.address, control_token=TOKEN) as channel,
    ):
        rollouts: list[events_pb2.Rollout] = []

        # 0. the RM is untrained, then trained on too little: the worker makes nothing
        wait_for(lambda: metric(worker, "rlhf_rollout_waiting_for_reward_model") == 1.0, 120, "waiting for the RM")
        feedback = comparisons(4)
        with EventProducer(broker.bootstrap) as producer, sync_channel(rm.address) as rm_channel:
            producer.publish_many([(topics.feedback, ev, ev.conversation_id) for ev in feedback[:2]])
            info = reward_pb2_grpc.RewardServiceStub(rm_channel).GetInfo
            wait_for(
                lambda: (
                    info(reward_pb2.RewardInfoRequest(), timeout=10).examples_seen == 2
                    and info(reward_pb2.RewardInfoRequest(), timeout=10).rm_version >= 1
                ),
                120,
                "RM trained on 2",
            )
            time.sleep(2)
            assert metric(worker, "rlhf_rollout_waiting_for_reward_model") == 1.0
            assert consumer.poll(timeout_ms=500) == [], "rollouts scored by a reward model below min_rm_examples"
            producer.publish_many([(topics.feedback, ev, ev.conversation_id) for ev in feedback[2:]])
        wait_for(lambda: metric(worker, "rlhf_rollout_waiting_for_reward_model") == 0.0, 120, "RM trained on 4")

        def held_back_at(total: int) -> bool:
            rollouts.extend(r.event for r in consumer.poll(timeout_ms=300))
            return len(rollouts) >= total and metric(worker, "rlhf_rollout_backpressure") == 1.0

        # 1. version 0: exactly one budget, then the worker waits
        wait_for(lambda: held_back_at(BUDGET), 120, "first budget")
        time.sleep(2)  # give an over-producing worker the chance to show it
        rollouts.extend(r.event for r in consumer.poll(timeout_ms=1000))
        assert len(rollouts) == BUDGET, worker.log()
        assert metric(worker, "rlhf_rollout_budget_remaining") == 0

        # 2. a newer version served: nothing more until the learner announces it; then one
        #    more budget, all from version 1
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        stub.LoadVersion(generation_pb2.LoadVersionRequest(version=1), timeout=60)
        time.sleep(2)
        rollouts.extend(r.event for r in consumer.poll(timeout_ms=1000))
        assert len(rollouts) == BUDGET, "a version the generator serves moved the budget"
        with EventProducer(broker.bootstrap) as producer:
            producer.publish(
                topics.policy_updates,
                new_event(
                    events_pb2.PolicyUpdate,
                    version=1,
                    sha256=v1.sha256,
                    format=common_pb2.WEIGHT_FORMAT_FULL,
                    action=events_pb2.POLICY_ACTION_PROMOTED,
                ),
                key="policy",
            )
        wait_for(lambda: held_back_at(BUDGET + PER_VERSION), 120, "second budget")

        # 3. the learner announces a version (here: rejected by the drift gate): one more batch
        with EventProducer(broker.bootstrap) as producer:
            producer.publish(
                topics.policy_updates,
                new_event(events_pb2.PolicyUpdate, version=2, action=events_pb2.POLICY_ACTION_REJECTED),
                key="policy",
            )
        wait_for(lambda: held_back_at(BUDGET + 2 * PER_VERSION), 120, "third budget")
        time.sleep(2)
        rollouts.extend(r.event for r in consumer.poll(timeout_ms=1000))

    assert len(rollouts) == BUDGET + 2 * PER_VERSION
    assert [r.policy_version for r in rollouts] == [0] * BUDGET + [1] * (2 * PER_VERSION)
    base = load_causal_lm(tiny_model_dir)
    new = load_causal_lm(other)
    groups: dict[str, list] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
        n = len(r.response_token_ids)
        assert 0 < n <= 8 and len(r.logprobs) == n and len(r.ref_logprobs) == n
        assert r.finish_reason in ("stop", "length") and r.source in ("live", "prompt_set")
        assert r.prompt_id and r.event_id and r.schema_version == 1 and r.response is not None
        assert math.isfinite(r.score) and math.isfinite(r.raw_score) and r.rm_version >= 1
        # the reference service's log-probs are π_ref's (the base model) ...
        ref_lp = sequence_logprobs(base, list(r.prompt_token_ids), list(r.response_token_ids))
        assert (ref_lp - torch.tensor(list(r.ref_logprobs))).abs().max() < 1e-4
        # ... and the policy's are those of the version the rollout names
        pol_lp = sequence_logprobs(
            base if r.policy_version == 0 else new, list(r.prompt_token_ids), list(r.response_token_ids)
        )
        assert (pol_lp - torch.tensor(list(r.logprobs))).abs().max() < 1e-4
    assert all(len(g) == 2 and len({r.prompt_id for r in g}) == 1 for g in groups.values())
    assert all(r.group_size == 2 for r in rollouts)  # what the learner's group objectives count on
    live = [r for r in rollouts if r.source == "live"]
    assert len(live) == 2 and live[0].prompt[-1].content == live_question and live[0].prompt_id == "live:c1"
