"""Quarantine in the reward service, through the real broker and its real entrypoint (tiny
backbone): raters who flip every label on items other raters also judged are quarantined
(the gauge says how many), and their later events are copied to the quarantine topic
instead of being trained."""

from __future__ import annotations

import random

import pytest

from rlhf.bus import EventProducer, new_event
from rlhf.v1 import common_pb2, events_pb2
from tests.gateway_stack import consume
from tests.integration.test_reward_service import env_for, metric
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow


def vote(rater: str, item: int, flip: bool) -> events_pb2.Feedback:
    good, bad = f"a short answer {item}", f"a long rambling answer number {item} " * 3
    chosen, rejected = (bad, good) if flip else (good, bad)
    return new_event(
        events_pb2.Feedback,
        conversation_id=f"c{item}",
        prompt=[common_pb2.ChatMessage(role="user", content=f"question {item}")],
        comparison=events_pb2.Comparison(chosen=chosen, rejected=rejected),
        rater_id=rater,
        source="simulated",
    )


def test_flippers_are_quarantined_and_their_events_go_to_the_quarantine_topic(broker, topics, tmp_path):
    rng = random.Random(0)
    raters = [f"header:r{i}" for i in range(6)]
    flippers = set(raters[:2])
    events = [
        vote(r, item, r in flippers) for item in range(60) for r in rng.sample(raters, 3)
    ]  # 180 votes, 30 per rater
    env = env_for(
        broker,
        topics,
        RLHF_REWARD_RELIABILITY_MIN_VOTES="10",
        RLHF_REWARD_RELIABILITY_REFIT_EVERY="16",
        RLHF_REWARD_MAX_RESPONSE_CHARS="500",
    )
    with run_service("reward", tmp_path, env=env) as svc, EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        wait_for(
            lambda: metric(svc, "rlhf_reward_quarantined_raters") >= 2, 180, "two raters quarantined", detail=svc.log
        )
        assert metric(svc, "rlhf_reward_quarantined_raters") == 2
        late = [vote("header:r0", 1000 + i, True) for i in range(3)]
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in late])
        held = consume(
            broker.bootstrap,
            topics.feedback_quarantine,
            events_pb2.Feedback,
            lambda es: {e.event_id for e in late} <= {e.event_id for e in es},
            group="quarantine-test",
        )
        assert {e.event_id for e in late} <= {e.event_id for e in held}
        assert all(e.rater_id in flippers for e in held)
        assert metric(svc, "rlhf_reward_quarantined_events_total") >= 3
        assert "rater quarantined" in svc.log_path.read_text()
