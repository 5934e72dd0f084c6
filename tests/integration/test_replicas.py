"""Two generators and two rollout workers in one consumer group (membership=group), from
their real entrypoints, against the real broker, reward and reference services, tiny models.
The test plays the learner: it announces the terms (rollouts_per_version=4,
max_policy_lag=1: a budget of 8 rollouts per announcement) and promotes a version.

Under test:
- the two workers split rlhf.interactions (2 partitions) and the budget between them: each
  holds one partition and produces 4 rollouts per announcement, together exactly 8 (two
  workers each spending the whole budget would make 16);
- after a promotion both generators serve the new version;
- SIGKILL one worker: the other takes over its partition and its share (8 per announcement)
  and the live prompts the dead one had read but not answered are read again: every live
  prompt published is answered (counted by prompt id).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import urllib.request
import uuid

import pytest
from safetensors.torch import load_file

from rlhf.bus import EventConsumer, EventProducer, Topics, ensure_topics, new_event
from rlhf.models import build_tiny_model
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

BUDGET = 8  # rollouts_per_version 4 × (max_policy_lag 1 + 1)
SAMPLES = 2
LIVE_PROMPTS = 12
THREADS = {"RLHF_TORCH_THREADS": "1", "RLHF_REFERENCE_TORCH_THREADS": "1", "RLHF_REWARD_TORCH_THREADS": "1"}
# short group timeouts: the embedded broker holds a join for the whole max_poll_interval_ms
GROUP = {
    "RLHF_ROLLOUT_KAFKA_MEMBERSHIP": "group",
    "RLHF_ROLLOUT_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "RLHF_ROLLOUT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "RLHF_ROLLOUT_KAFKA_MAX_POLL_INTERVAL_MS": "8000",
}


def metric(svc, name: str) -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return math.nan
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return math.nan


def announce(bootstrap: str, topics: Topics, version: int, **fields) -> None:
    with EventProducer(bootstrap) as producer:
        producer.publish(
            topics.policy_updates, new_event(events_pb2.PolicyUpdate, version=version, **fields), key="policy"
        )


def test_two_workers_share_partitions_and_budget_and_a_killed_ones_share_is_taken_over(
    tmp_path, broker, tiny_model_dir
):
    topics = Topics(f"test-replicas-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, [topics.interactions], partitions=2)
    ensure_topics(broker.bootstrap, topics.all())
    store = WeightStore(tmp_path / "weights")
    other = build_tiny_model(tmp_path / "other", seed=1, initializer_range=0.2)
    v1 = store.put(1, load_file(str(other / "model.safetensors")), meta={"promoted": True})
    bus = {"RLHF_KAFKA_BOOTSTRAP": broker.bootstrap, "RLHF_TOPIC_PREFIX": topics.prefix, **THREADS}

    live_ids, by_partition, where = set(), {0: 0, 1: 0}, {}
    with EventProducer(broker.bootstrap) as producer:
        for i in range(LIVE_PROMPTS):
            meta = producer.publish(
                topics.interactions,
                new_event(
                    events_pb2.Interaction,
                    conversation_id=f"c{i}",
                    prompt=[common_pb2.ChatMessage(role="user", content=f"Live question {i}?")],
                ),
                key=f"c{i}",
            )
            live_ids.add(f"live:c{i}")
            by_partition[meta.partition] += 1
            where[f"live:c{i}"] = meta.partition
    assert all(by_partition.values()), f"every live prompt went to one partition: {by_partition}"

    generator_env = {
        **bus,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "transformers",
        "RLHF_WEIGHT_STORE": str(store.root),
    }
    with contextlib.ExitStack() as stack:
        rm = stack.enter_context(
            run_service("reward", tmp_path, env={**bus, "RLHF_REWARD_BACKBONE": "tiny", "RLHF_REWARD_MAX_TOKENS": "64"})
        )
        ref = stack.enter_context(run_service("reference", tmp_path, env={**bus, "RLHF_MODEL": str(tiny_model_dir)}))
        gens, workers = [], []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gens.append(stack.enter_context(run_service("generator", tmp_path / name, env=generator_env)))
        for name, gen in zip(("a", "b"), gens):
            workers.append(
                stack.enter_context(
                    run_service(
                        "rollout",
                        tmp_path / name,
                        env={
                            **bus,
                            **GROUP,
                            "RLHF_ROLLOUT_GROUP_ID": f"rollout-{topics.prefix}",
                            "RLHF_GENERATOR_ADDR": gen.address,
                            "RLHF_REWARD_ADDR": rm.address,
                            "RLHF_REFERENCE_ADDR": ref.address,
                            "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": str(SAMPLES),
                            "RLHF_ROLLOUT_MAX_TOKENS": "4",
                            "RLHF_LIVE_FRACTION": "1.0",
                            "RLHF_ROLLOUT_CONCURRENCY": "1",
                            "RLHF_ROLLOUT_VERSION_POLL_SECONDS": "0.3",
                            "RLHF_ROLLOUT_MIN_RM_EXAMPLES": "0",
                            "RLHF_LEARNER_ADDR": "",
                        },
                    )
                )
            )
        consumer = stack.enter_context(
            EventConsumer(broker.bootstrap, topics.rollouts, events_pb2.Rollout, group_id=f"test-{topics.prefix}")
        )
        rollouts: list[events_pb2.Rollout] = []

        def logs() -> str:
            return "\n".join(f"--- {w.log_path}\n{w.log(30)}" for w in workers)

        def held_back_at(total: int, alive) -> bool:
            rollouts.extend(r.event for r in consumer.poll(timeout_ms=300))
            return len(rollouts) >= total and all(metric(w, "rlhf_rollout_backpressure") == 1.0 for w in alive)

        def settled(total: int, alive, what: str) -> None:
            wait_for(lambda: held_back_at(total, alive), 180, what, detail=logs)
            time.sleep(2)  # give an over-producing worker the chance to show it
            rollouts.extend(r.event for r in consumer.poll(timeout_ms=1000))
            assert len(rollouts) == total, f"{what}: {len(rollouts)} rollouts, budget allows {total}\n{logs()}"

        # 0. the group splits the two partitions, one each
        wait_for(
            lambda: [metric(w, "rlhf_rollout_live_partitions") for w in workers] == [1.0, 1.0],
            180,
            "each worker holding one partition",
            detail=logs,
        )

        # 1. the learner's terms: the two workers together make one budget, half each
        announce(broker.bootstrap, topics, 0, action=events_pb2.POLICY_ACTION_PROMOTED, rollouts_per_version=4,
                 max_policy_lag=1, temperature=1.0)  # fmt: skip
        settled(BUDGET, workers, "first budget")
        assert [metric(w, "rlhf_rollout_budget_rollouts") for w in workers] == [BUDGET / 2] * 2

        # 2. a promotion: both generators load it from the weight store; one more budget
        announce(broker.bootstrap, topics, 1, sha256=v1.sha256, format=common_pb2.WEIGHT_FORMAT_FULL,
                 action=events_pb2.POLICY_ACTION_PROMOTED)  # fmt: skip

        def served() -> list[int]:
            out = []
            for g in gens:
                with sync_channel(g.address) as ch:
                    info = generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(
                        generation_pb2.GetInfoRequest(), timeout=10
                    )
                    out.append(info.policy_version)
            return out

        wait_for(lambda: served() == [1, 1], 120, "both generators serving version 1")
        settled(2 * BUDGET, workers, "second budget")

        # 3. SIGKILL worker a: b takes over its partition, its share and its unanswered prompts
        dead, survivor = workers
        dead.stop(signal.SIGKILL)
        wait_for(
            lambda: metric(survivor, "rlhf_rollout_live_partitions") == 2.0,
            180,
            "the survivor holding both partitions",
            detail=logs,
        )
        version, total = 2, 2 * BUDGET
        while not live_ids <= {r.prompt_id for r in rollouts} and version < 8:
            announce(broker.bootstrap, topics, version, action=events_pb2.POLICY_ACTION_REJECTED)
            total += BUDGET
            settled(total, [survivor], f"budget {version + 1}, one worker left")
            assert metric(survivor, "rlhf_rollout_budget_rollouts") == BUDGET
            version += 1

    answered = {r.prompt_id for r in rollouts if r.source == "live"}
    lost = {i: where[i] for i in sorted(live_ids - answered)}
    assert answered == live_ids, f"live prompts lost (id: partition): {lost}"
    groups: dict[str, list] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
    assert all(len(g) == SAMPLES and len({r.prompt_id for r in g}) == 1 for g in groups.values())
