"""The learner's canary against the real broker, from its real entrypoint: a version that
passes the drift gate goes to canary (not straight to serving), users' feedback on the two
versions decides — thumbs that dislike it roll it back, head-to-head picks that prefer it
promote it — each decision is a PolicyUpdate with its evidence, and the operator's
Promote / SetCanary / GetCanary (and the `rlhf versions | canary | promote` commands) work
and need the control token as Pause does."""

from __future__ import annotations

import json
import random
import signal
import urllib.request

import grpc
import pytest

from rlhf.bus import EventConsumer, EventProducer, new_event
from rlhf.cli import main as cli
from rlhf.serving.client import sync_channel
from rlhf.v1 import events_pb2, learner_pb2, learner_pb2_grpc
from tests.integration.test_learner_service import publish, sampler  # noqa: F401 - the fixture
from tests.procs import run_service, wait_for

TOKEN = "canary-test-token"
CANARY, PROMOTED, ROLLED_BACK = (
    events_pb2.POLICY_ACTION_CANARY,
    events_pb2.POLICY_ACTION_PROMOTED,
    events_pb2.POLICY_ACTION_ROLLED_BACK,
)


def learner_env(broker, topics, tiny_model_dir) -> dict[str, str]:
    return {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": "4",
        "RLHF_LEARNER_MINIBATCH_SIZE": "2",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "2",
        "RLHF_LEARNER_PPO_EPOCHS": "1",
        "RLHF_LEARNER_MAX_POLICY_LAG": "1",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
        "RLHF_LEARNER_TORCH_THREADS": "1",
        "RLHF_CONTROL_TOKEN": TOKEN,
        "RLHF_CANARY_ENABLED": "true",
        "RLHF_CANARY_MIN_EVENTS_PER_ARM": "10",
    }


class Updates:
    """Every PolicyUpdate on the topic, read as they come."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = EventConsumer(bootstrap, topic, events_pb2.PolicyUpdate, group_id="test-canary-reader")
        self.seen: list[events_pb2.PolicyUpdate] = []

    def until(self, what: str, done) -> events_pb2.PolicyUpdate:
        def check():
            self.seen += [r.event for r in self.consumer.poll(timeout_ms=200)]
            return next((u for u in self.seen if done(u)), None)

        return wait_for(check, 120, what)


def ratings(stable: int, candidate: int, p_stable: float, p_candidate: float, n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = candidate if i % 2 else stable
        up = rng.random() < (p_candidate if v == candidate else p_stable)
        out.append(
            new_event(
                events_pb2.Feedback,
                conversation_id=f"c{i}",
                source="simulated",
                rating=events_pb2.Rating(response_id=f"r{i}", response="x", value=1 if up else -1, policy_version=v),
            )
        )
    return out


def picks(stable: int, candidate: int, p_candidate_wins: float, n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        won, lost = (candidate, stable) if rng.random() < p_candidate_wins else (stable, candidate)
        out.append(
            new_event(
                events_pb2.Feedback,
                conversation_id=f"p{i}",
                source="simulated",
                comparison=events_pb2.Comparison(
                    chosen_id=f"a{i}",
                    chosen="x",
                    rejected_id=f"b{i}",
                    rejected="y",
                    chosen_policy_version=won,
                    rejected_policy_version=lost,
                ),
            )
        )
    return out


def send_feedback(bootstrap: str, topic: str, events: list) -> None:
    with EventProducer(bootstrap) as producer:
        producer.publish_many([(topic, e, e.conversation_id) for e in events])


def test_feedback_rolls_back_a_disliked_candidate_and_promotes_a_preferred_one(
    broker, topics, tiny_model_dir, tmp_path, sampler, capsys, request
):
    with run_service("learner", tmp_path, env=learner_env(broker, topics, tiny_model_dir), timeout=180) as svc:
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address, control_token=TOKEN))
        plain = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address))
        for call, message in (  # not `request`: that is the pytest fixture, used below
            (plain.Promote, learner_pb2.PromoteRequest(version=1)),
            (plain.SetCanary, learner_pb2.SetCanaryRequest(set_share=True, share=0.5)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(message, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        canary = plain.GetCanary(learner_pb2.GetCanaryRequest(), timeout=30)  # reading is open
        assert (canary.enabled, canary.stable_version, canary.candidate_version, canary.share) == (True, 0, 0, 0.1)
        updates = Updates(broker.bootstrap, topics.policy_updates)
        request.addfinalizer(updates.consumer.close)

        # 1. version 1 passes the drift gate: it goes to canary, stable stays 0
        publish(broker.bootstrap, topics.rollouts, sampler(4, version=0, seed=1))
        start = updates.until("v1 in canary", lambda u: u.action == CANARY and u.version == 1)
        assert (start.stable_version, start.candidate_version, start.canary_share) == (0, 1, pytest.approx(0.1))
        assert start.sha256 and start.uri  # the candidate's weights, for the generators
        assert not any(u.action == PROMOTED and u.version == 1 for u in updates.seen)
        assert stub.Pause(learner_pb2.PauseRequest(), timeout=60).paused  # no further versions; the canary reads on
        status = stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=30)
        assert status.serving_version == 0 and status.policy_version == 1

        # 2. thumbs that dislike it (stable 0.8 up, candidate 0.1): rolled back, with the evidence
        send_feedback(broker.bootstrap, topics.feedback, ratings(0, 1, 0.8, 0.1, 200, seed=1))
        back = updates.until("v1 rolled back", lambda u: u.action == ROLLED_BACK)
        assert (back.version, back.stable_version, back.candidate_version) == (0, 0, 0)
        decision = json.loads(back.decision_json)
        assert decision["candidate"] == 1 and decision["verdict"] == "roll_back" and decision["by"] == "rule"
        ev = decision["evidence"]
        assert ev["reason"] == "worse" and ev["log_e_rollback"] >= ev["log_threshold_rollback"]
        assert ev["thumbs_up_rate_candidate"] < ev["thumbs_up_rate_stable"]
        assert ev["events_stable"] >= 10 and ev["events_candidate"] >= 10
        canary = stub.GetCanary(learner_pb2.GetCanaryRequest(), timeout=30)
        assert canary.candidate_version == 0 and json.loads(canary.last_decision_json)["verdict"] == "roll_back"
        # the gauges follow the decision's event a moment later (the loop exports them after publishing)
        wanted = (
            'rlhf_learner_canary_decisions_total{by="rule",verdict="roll_back"} 1.0',
            "rlhf_learner_canary_candidate_version 0.0",
        )

        def scraped():
            page = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
            return all(w in page for w in wanted)

        wait_for(scraped, 30, f"metrics {wanted}")

        # 3. the next version (trained on from stable 0: on_reject=revert) goes to canary
        assert not stub.Resume(learner_pb2.ResumeRequest(), timeout=30).paused
        publish(broker.bootstrap, topics.rollouts, sampler(4, version=0, seed=2))
        start = updates.until("v2 in canary", lambda u: u.action == CANARY and u.version == 2)
        assert (start.stable_version, start.candidate_version) == (0, 2)
        stub.Pause(learner_pb2.PauseRequest(), timeout=60)
        assert cli(["canary", "--learner", svc.address, "--token", TOKEN, "--share", "0.25"]) == 0
        assert "candidate v2 at share 0.25" in capsys.readouterr().out
        share = updates.until("the new share announced", lambda u: u.action == CANARY and u.canary_share == 0.25)
        assert share.candidate_version == 2

        # 4. head-to-head picks that prefer it (0.85): promoted; stable is 2 from now on
        send_feedback(broker.bootstrap, topics.feedback, picks(0, 2, 0.85, 200, seed=3))
        up = updates.until("v2 promoted", lambda u: u.action == PROMOTED and u.version == 2)
        assert (up.stable_version, up.candidate_version) == (2, 0)
        ev = json.loads(up.decision_json)["evidence"]
        assert ev["reason"] == "better" and ev["wins_candidate"] > ev["wins_stable"]
        assert stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).serving_version == 2

        # 5. the commands: versions (open), promote (an operator's decision)
        assert cli(["versions", "--learner", svc.address]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == ["v0", "v1", "v2"]
        assert "[stable]" in lines[2] and "passed the drift gate" in lines[1]
        assert cli(["promote", "1", "--learner", svc.address, "--token", TOKEN]) == 0
        assert "stable v1" in capsys.readouterr().out
        manual = updates.until("operator promotion of v1", lambda u: u.action == PROMOTED and u.version == 1)
        assert json.loads(manual.decision_json)["by"] == "operator" and manual.stable_version == 1
        assert cli(["promote", "1", "--learner", svc.address, "--token", TOKEN]) == 1
        assert "already the stable version" in capsys.readouterr().err
        assert cli(["canary", "--learner", svc.address, "--token", TOKEN, "--share", "2"]) == 1
        assert "outside [0, 1]" in capsys.readouterr().err

        assert svc.stop(signal.SIGTERM) == 0, svc.log()
