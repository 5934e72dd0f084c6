"""The reward service through the real broker, from its real entrypoint, tiny backbone:
synthetic-preference feedback trains the RM past 0.8 held-out accuracy; each version is
announced; the same events sent twice change nothing; SIGKILL mid-training resumes from
the checkpoint without re-training consumed events; oversized Score input is refused."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from rlhf.bus import EventConsumer, EventProducer
from rlhf.serving.client import sync_channel
from rlhf.testing.preferences import SyntheticPreference
from rlhf.v1 import common_pb2, events_pb2, reward_pb2, reward_pb2_grpc
from rlhf.weightstore import sha256_file
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow  # trains a model through real processes: ~1 min on 2 cores

TINY = {
    "RLHF_REWARD_BACKBONE": "tiny",
    "RLHF_REWARD_MAX_TOKENS": "64",
    "RLHF_REWARD_LR": "1e-3",
    "RLHF_REWARD_TRAIN_BATCH_SIZE": "16",
    "RLHF_REWARD_POLL_TIMEOUT_MS": "200",
    "RLHF_REWARD_TORCH_THREADS": "1",  # 2 shared cores: more threads thrash
}


def env_for(broker, topics, **extra) -> dict[str, str]:
    return {"RLHF_KAFKA_BOOTSTRAP": broker.bootstrap, "RLHF_TOPIC_PREFIX": topics.prefix, **TINY, **extra}


def stub(address: str):
    return reward_pb2_grpc.RewardServiceStub(sync_channel(address))


def info(address: str) -> reward_pb2.RewardInfo:
    return stub(address).GetInfo(reward_pb2.RewardInfoRequest(), timeout=10)


def metric(svc, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


def score(address: str, items: list[tuple[list[dict], str]]) -> reward_pb2.ScoreResponse:
    req = reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(prompt=[common_pb2.ChatMessage(**m) for m in p], response=r) for p, r in items]
    )
    return stub(address).Score(req, timeout=60)


def held_out_accuracy(address: str, pairs) -> tuple[float, reward_pb2.ScoreResponse]:
    resp = score(address, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs])
    n = len(pairs)
    raw = list(resp.raw_scores)
    return sum(raw[i] > raw[n + i] for i in range(n)) / n, resp


def test_feedback_trains_the_rm_versions_are_announced_and_duplicates_change_nothing(broker, topics, tmp_path):
    gen, held = SyntheticPreference(seed=1), SyntheticPreference(seed=2)
    events = [gen.comparison_event() for _ in range(320)]
    test_pairs = [held.pair() for _ in range(100)]
    env = env_for(
        broker,
        topics,
        RLHF_REWARD_PUBLISH_EVERY_STEPS="5",
        RLHF_REWARD_MAX_ITEMS="256",
        RLHF_REWARD_MAX_RESPONSE_CHARS="500",
        RLHF_REWARD_MAX_PROMPT_CHARS="1000",
    )
    with run_service("reward", tmp_path, env=env) as svc, EventProducer(broker.bootstrap) as producer:
        before, _ = held_out_accuracy(svc.address, test_pairs)
        assert info(svc.address).rm_version == 0

        # 1. the synthetic preference, through the broker
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        wait_for(lambda: info(svc.address).pairs_seen == 320, 120, "320 pairs trained", detail=svc.log)
        # 20 steps of 16, or a few more when a poll ends mid-batch
        step = info(svc.address).train_step
        assert step >= 20
        # the topic ran dry: a last version, then its checkpoint (written after the swap)
        trainer_states = tmp_path / "state-reward" / "reward" / "trainer"
        wait_for(lambda: list(trainer_states.glob(f"state-{step:09d}-*.pt")), 60, "the idle checkpoint", detail=svc.log)
        trained = info(svc.address)
        # a version every 5 steps, and one when the topic ran dry
        assert trained.train_step == step and trained.rm_version >= 4
        version = trained.rm_version
        accuracy, first = held_out_accuracy(svc.address, test_pairs)
        assert accuracy > 0.8 > before, (before, accuracy)
        assert first.rm_version == version
        assert trained.online_accuracy > 0.5 and metric(svc, "rlhf_rm_accuracy_ratio") == pytest.approx(
            trained.online_accuracy
        )
        assert metric(svc, 'rlhf_reward_feedback_events_total{kind="comparison"}') == 320
        assert metric(svc, "rlhf_rm_pairs_total") == 320 and metric(svc, "rlhf_rm_version") == version
        # normalised scores use the version's running mean/std and are clipped
        assert all(abs(s) <= 5.0 for s in first.scores) and list(first.scores) != list(first.raw_scores)

        # 2. every version was announced, pointing at checksummed weights
        with EventConsumer(broker.bootstrap, topics.reward_updates, events_pb2.RewardModelUpdate, "test") as c:
            updates = []
            wait_for(
                lambda: updates.extend(r.event for r in c.poll(timeout_ms=500)) or len(updates) >= version,
                30,
                "updates",
            )
        assert [u.version for u in updates] == list(range(1, version + 1))
        steps = [u.train_step for u in updates]
        assert steps[-1] == step and all(0 < b - a <= 5 for a, b in zip([0] + steps, steps))
        last = updates[-1]
        assert sha256_file(Path(last.uri) / "model.safetensors") == last.sha256
        assert last.pairs_seen == 320 and last.score_std > 0 and 0 < last.online_accuracy <= 1

        # 3. the same events again: dropped by event id, nothing moves
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        wait_for(lambda: metric(svc, "rlhf_feedback_duplicates_total") == 320, 60, "duplicates dropped", detail=svc.log)
        again = info(svc.address)
        assert (again.train_step, again.pairs_seen, again.rm_version) == (step, 320, version)
        _, second = held_out_accuracy(svc.address, test_pairs)
        assert list(second.raw_scores) == list(first.raw_scores) and list(second.scores) == list(first.scores)

        # 4. thumbs: a lone rating trains pointwise, an opposite one for the same prompt pairs
        prompt = gen.prompt()
        up, down = gen.rating_event(prompt, good=True), gen.rating_event(prompt, good=False)
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in (up, down)])
        wait_for(
            lambda: (
                metric(svc, 'rlhf_reward_feedback_events_total{kind="thumbs"}') == 2
                and metric(svc, "rlhf_rm_pointwise_total") == 1
            ),
            60,
            "thumbs trained",
            detail=svc.log,
        )
        assert info(svc.address).pairs_seen == 321  # the second rating paired with the first

        # 5. oversized input names the field and the limit
        for items, field in [
            ([(gen.prompt(), "x")] * 257, "items: 257 items > limit 256"),
            ([(gen.prompt(), "x" * 501)], "items[0].response: 501 characters > limit 500"),
            (
                [(gen.prompt(), "ok"), ([{"role": "user", "content": "q" * 1001}], "ok")],
                "items[1].prompt: 1001 characters > limit 1000",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                score(svc.address, items)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
        assert score(svc.address, []).scores == []


def test_sigkill_mid_training_resumes_from_the_checkpoint(broker, topics, tmp_path):
    gen = SyntheticPreference(seed=3)
    events = [gen.comparison_event() for _ in range(104)]
    with EventProducer(broker.bootstrap) as producer:
        # all on the topic before the service starts: every poll returns a full batch
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
    # one step per poll; checkpoint at step 10 only (never on idle, never by the clock)
    env = env_for(
        broker,
        topics,
        RLHF_REWARD_TRAIN_BATCH_SIZE="8",
        RLHF_REWARD_MAX_POLL_RECORDS="8",
        RLHF_REWARD_PUBLISH_EVERY_STEPS="5",
        RLHF_REWARD_CHECKPOINT_EVERY_STEPS="10",
        RLHF_REWARD_CHECKPOINT_EVERY_SECONDS="100000",
        RLHF_REWARD_CHECKPOINT_WHEN_IDLE="false",
    )
    with run_service("reward", tmp_path, env=env) as svc:
        wait_for(lambda: info(svc.address).pairs_seen == 104, 120, "all 104 pairs trained", detail=svc.log)
        assert info(svc.address).train_step == 13
        svc.stop(signal.SIGKILL)  # steps 11-13 were never checkpointed

    states = sorted((tmp_path / "state-reward" / "reward" / "trainer").glob("state-*.pt"))
    assert [p.name for p in states] == ["state-000000010-v000002.pt"]

    with run_service("reward", tmp_path, env=env) as svc:
        restored = info(svc.address)
        # resumed from the checkpoint, exactly (the replay of 81-104 may have begun)
        assert restored.rm_version == 2 and restored.train_step >= 10
        wait_for(
            lambda: info(svc.address).pairs_seen == 104, 120, "the uncheckpointed 24 pairs re-trained", detail=svc.log
        )
        time.sleep(1.0)  # anything more would show up now
        final = info(svc.address)
        # only the 3 lost steps were redone: events up to the checkpoint were not re-trained
        assert (final.train_step, final.pairs_seen) == (13, 104)
        assert metric(svc, "rlhf_rm_train_steps_total") == 3
        assert metric(svc, 'rlhf_reward_feedback_events_total{kind="comparison"}') == 24
        assert svc.stop(signal.SIGTERM) == 0  # a graceful stop checkpoints what is left
    states = sorted((tmp_path / "state-reward" / "reward" / "trainer").glob("state-*.pt"))
    assert states[-1].name.startswith("state-000000013-")
