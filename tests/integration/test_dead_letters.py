"""Events that decode but mean nothing are dead-lettered with the reason, through the real
broker, and the consumer goes on: the reward service from its real entrypoint (bad
feedback beside good feedback that still trains) and the rollout worker's live-prompt
feed. The learner's cases are in test_learner_service.py."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from types import SimpleNamespace

import pytest
from kafka import KafkaConsumer, TopicPartition

from rlhf.bus import EventProducer, Topics, new_event
from rlhf.rollout.feeds import BusFeeds
from rlhf.rollout.sources import PromptMixer
from rlhf.serving.client import sync_channel
from rlhf.testing.preferences import SyntheticPreference
from rlhf.v1 import common_pb2, events_pb2, reward_pb2, reward_pb2_grpc
from tests.procs import run_service, wait_for


def dead_letters(bootstrap: str, topic: str, n: int, timeout: float = 60) -> list:
    """The first n messages of `topic`'s .dlq twin (raw ConsumerRecords), and no more."""
    dlq = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    dlq.assign([TopicPartition(Topics.dlq(topic), 0)])
    got, deadline = [], time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            got += [m for batch in dlq.poll(500).values() for m in batch]
        assert len(got) == n, f"{len(got)} dead letters on {Topics.dlq(topic)}, expected {n}"
        assert dlq.poll(500) == {}, "more dead letters than expected"
    finally:
        dlq.close()
    return got


def why(message) -> str:
    return dict(message.headers)["dlq.error"].decode()


def metrics_text(svc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    match = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def feedback(event_id: str, prompt: str = "hi", **kind) -> events_pb2.Feedback:
    return new_event(
        events_pb2.Feedback,
        event_id=event_id,
        conversation_id=event_id,
        prompt=[common_pb2.ChatMessage(role="user", content=prompt)] if prompt else [],
        **kind,
    )


@pytest.mark.slow  # the reward service trains through a real process: ~30 s on 2 cores
def test_reward_service_dead_letters_meaningless_feedback_and_trains_on_the_rest(broker, topics, tmp_path):
    bad = {
        "rating-5": feedback("rating-5", rating=events_pb2.Rating(response="ok", value=5)),
        "rating-0": feedback("rating-0", rating=events_pb2.Rating(response="ok", value=0)),
        "empty-answer": feedback("empty-answer", rating=events_pb2.Rating(response="", value=1)),
        "no-kind": feedback("no-kind"),
        "no-prompt": feedback("no-prompt", prompt="", rating=events_pb2.Rating(response="ok", value=1)),
        "same-twice": feedback("same-twice", comparison=events_pb2.Comparison(chosen="a", rejected="a")),
        "huge-prompt": feedback(
            "huge-prompt", prompt="x" * 1001, comparison=events_pb2.Comparison(chosen="a", rejected="b")
        ),
    }
    expected = {
        "rating-5": "rating_out_of_range: rating.value: 5",
        "rating-0": "rating_out_of_range",
        "empty-answer": "empty_response: rating.response is empty",
        "no-kind": "no_rating_or_comparison",
        "no-prompt": "empty_prompt",
        "same-twice": "identical_responses",
        "huge-prompt": "too_long: prompt: 1001 characters > limit 1000 (RLHF_REWARD_MAX_PROMPT_CHARS)",
    }
    gen = SyntheticPreference(seed=1)
    good = [gen.comparison_event() for _ in range(32)]
    # bad events interleaved with good ones, so the loop must go on past each of them
    events = [e for pair in zip(list(bad.values()) + [None] * 32, good) for e in pair if e is not None]
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_REWARD_BACKBONE": "tiny",
        "RLHF_REWARD_MAX_TOKENS": "64",
        "RLHF_REWARD_TRAIN_BATCH_SIZE": "16",
        "RLHF_REWARD_POLL_TIMEOUT_MS": "200",
        "RLHF_REWARD_TORCH_THREADS": "1",
        "RLHF_REWARD_MAX_PROMPT_CHARS": "1000",
    }
    with run_service("reward", tmp_path, env=env) as svc, EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        rm = reward_pb2_grpc.RewardServiceStub(sync_channel(svc.address))
        info = wait_for(
            lambda: (i := rm.GetInfo(reward_pb2.RewardInfoRequest(), timeout=10)).examples_seen == 32 and i,
            120,
            "32 good examples trained",
            detail=svc.log,
        )
        assert info.pairs_seen == 32

        dead = dead_letters(broker.bootstrap, topics.feedback, len(bad))
        by_id = {m.key.decode(): m for m in dead}
        assert set(by_id) == set(bad)
        for event_id, prefix in expected.items():
            assert why(by_id[event_id]).startswith(prefix), (event_id, why(by_id[event_id]))
            assert by_id[event_id].value == bad[event_id].SerializeToString()  # the original bytes
            assert dict(by_id[event_id].headers)["dlq.group"] == b"reward"
        text = metrics_text(svc)
        assert sample(text, "rlhf_kafka_dlq_messages_total", topic=topics.feedback, reason="invalid") == len(bad)
        assert sample(text, "rlhf_feedback_invalid_total", reason="rating_out_of_range") == 2
        assert sample(text, "rlhf_feedback_invalid_total", reason="too_long") == 1
        assert "feedback event refused" in svc.log(400)


def interaction(conversation_id: str, *contents: str) -> events_pb2.Interaction:
    return new_event(
        events_pb2.Interaction,
        conversation_id=conversation_id,
        prompt=[common_pb2.ChatMessage(role="user", content=c) for c in contents],
    )


def test_rollout_feed_dead_letters_empty_and_oversized_live_prompts(broker, topics):
    events = [
        interaction("empty"),
        interaction("blank", ""),
        interaction("ok-1", "What is 2+2?"),
        interaction("huge", "x" * 50),
        interaction("ok-2", "Name a colour."),
    ]
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.interactions, e, e.conversation_id) for e in events])
    feeds = BusFeeds(broker.bootstrap, topics, group_id="rollout", use_live=True, max_prompt_chars=40)
    feeds.open()
    prompts = PromptMixer([{"id": "p", "messages": [{"role": "user", "content": "set"}]}], live_fraction=1.0)
    try:

        async def poll_until_all_read():
            while len(prompts.live) < 2:
                await feeds._poll(SimpleNamespace(), prompts)

        asyncio.run(asyncio.wait_for(poll_until_all_read(), 60))
    finally:
        feeds.close()
    assert [p.prompt_id for p in prompts.live] == ["live:ok-1", "live:ok-2"]  # only these reach Generate
    dead = dead_letters(broker.bootstrap, topics.interactions, 3)
    assert [(m.key, why(m)) for m in dead] == [
        (b"empty", "empty: prompt: no messages"),
        (b"blank", "empty: prompt: every message is empty"),
        (b"huge", "too_long: prompt: 50 characters > limit 40"),
    ]
