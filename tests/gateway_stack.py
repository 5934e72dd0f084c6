"""Shared by the gateway's integration and web tests: the real generator (transformers
backend, tiny model) as a module fixture, the gateway's environment, and a consumer loop."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from rlhf.bus import EventConsumer, Topics, ensure_topics
from tests.procs import run_service


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_model_dir):
    """The generation service from its entrypoint (import this fixture into a test module)."""
    tmp = tmp_path_factory.mktemp("generator")
    # these tests push no policy versions, so the generator need not follow Kafka for them
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "transformers",
        "RLHF_METRICS_PORT": "0",
        "RLHF_FOLLOW_POLICY_UPDATES": "false",
    }
    with run_service("generator", tmp, env=env, timeout=180) as svc:
        yield svc


def fresh_topics(bootstrap: str, name: str) -> Topics:
    """Loop topics under a prefix no other test uses, created."""
    topics = Topics(f"test-{name}-{time.time_ns() % 10**12}")
    ensure_topics(bootstrap, topics.all())
    return topics


def gateway_env(generator, bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    """Environment of a gateway in front of `generator`; short answers keep the CPU free."""
    return {
        "RLHF_GENERATOR_ADDR": generator.address,
        "RLHF_KAFKA_BOOTSTRAP": bootstrap,
        "RLHF_TOPIC_PREFIX": prefix,
        "RLHF_DEFAULT_MAX_COMPLETION_TOKENS": "12",
        **extra,
    }


def consume(
    bootstrap: str, topic: str, cls, done: Callable[[list], bool], group: str = "test", timeout: float = 60
) -> list:
    """Events from the start of `topic` until `done(events)` (or the deadline passed)."""
    events: list = []
    with EventConsumer(bootstrap, topic, cls, group_id=group) as consumer:
        deadline = time.monotonic() + timeout
        while not done(events) and time.monotonic() < deadline:
            events += [r.event for r in consumer.poll(timeout_ms=500)]
    return events
