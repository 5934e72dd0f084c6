"""No feedback is lost to a broker outage: with the broker stopped, 100 feedback posts are
all accepted (committed to the SQLite outbox); once the broker is back on the same port,
the relay delivers all 100, each event id exactly once in what a consumer reads."""

from __future__ import annotations

import re

import httpx
import pytest

from rlhf.broker import EmbeddedBroker
from rlhf.bus import Topics
from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import free_port, run_service, wait_for

pytestmark = pytest.mark.slow


def _gauge(http: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M)
    return float(match.group(1))


def test_feedback_survives_a_broker_outage(tmp_path, generator):
    # Our own broker, on a fixed port, so it can come back where the gateway expects it.
    # (The embedded broker keeps topics in memory: the relay recreates them on reconnect.)
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
    topics = Topics("test-outbox")
    env = gateway_env(
        generator,
        broker.bootstrap,
        topics.prefix,
        RLHF_RELAY_MAX_BACKOFF_SECONDS="1",
        RLHF_RELAY_PUBLISH_TIMEOUT_SECONDS="2",
    )
    try:
        with run_service("gateway", tmp_path, env=env) as gw, httpx.Client(base_url=gw.url, timeout=60) as http:
            served = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2})
            assert served.status_code == 200, served.text
            a, b = (c["response_id"] for c in served.json()["choices"])

            broker.stop()
            # readiness reports Kafka away but stays SERVING: feedback still goes into the outbox
            ready = wait_for(
                lambda: (r := http.get("/readyz").json())["kafka"] == "NOT_SERVING" and r,
                10,
                "readyz kafka NOT_SERVING after the broker stopped",
            )
            assert ready["status"] == "SERVING"
            accepted = []
            for i in range(100):
                body = (
                    {"kind": "rating", "response_id": (a, b)[i % 2], "value": 1 if i % 3 else -1}
                    if i % 4
                    else {"kind": "comparison", "chosen_id": a, "rejected_id": b}
                )
                r = http.post("/v1/feedback", json=body)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["event_id"])
            assert len(set(accepted)) == 100
            wait_for(
                lambda: _gauge(http, "rlhf_outbox_backlog") >= 100, 60, "backlog gauge shows the 100 pending events"
            )
            assert _gauge(http, "rlhf_outbox_oldest_age_seconds") > 0

            broker.start()
            wait_for(lambda: _gauge(http, "rlhf_outbox_backlog") == 0, 60, "outbox drained after the broker returned")
            wait_for(lambda: http.get("/readyz").json()["kafka"] == "SERVING", 30, "readyz kafka SERVING again")

            events = consume(
                broker.bootstrap,
                topics.feedback,
                events_pb2.Feedback,
                lambda evs: len(evs) >= 100,
                group="outbox-test",
                timeout=30,
            )
            ids = [e.event_id for e in events]
            assert sorted(ids) == sorted(accepted)  # all 100 arrived, none twice
            kinds = {e.WhichOneof("kind") for e in events}
            assert kinds == {"rating", "comparison"}
    finally:
        broker.stop()
