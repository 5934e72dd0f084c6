"""Releasing a quarantined rater by hand, through the real broker, the reward service's
real entrypoint (tiny backbone) and real gRPC on loopback: `ReleaseRater` is a control RPC
(refused without the control token or with a wrong one), `ListRaters` is open, and a
release trains the rater's held examples and their events read back from the quarantine
topic, so the RM's example count rises by them; `rlhf raters` lists and releases."""

from __future__ import annotations

import random

import grpc
import pytest

from rlhf.bus import EventProducer, encode
from rlhf.cli import main as rlhf_main
from rlhf.serving.auth import control_metadata
from rlhf.v1 import events_pb2, reward_pb2
from tests.gateway_stack import consume
from tests.integration.test_reward_quarantine import vote
from tests.integration.test_reward_service import env_for, info, metric, stub
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

TOKEN = "release-test-token"


def raters(address: str) -> dict[str, reward_pb2.RaterInfo]:
    return {r.rater_id: r for r in stub(address).ListRaters(reward_pb2.ListRatersRequest(), timeout=60).raters}


def test_release_needs_the_token_and_replays_the_raters_events(broker, topics, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RLHF_CONTROL_TOKEN", raising=False)
    rng = random.Random(0)
    ids = [f"header:r{i}" for i in range(6)]
    flippers = set(ids[:2])
    events = [vote(r, item, r in flippers) for item in range(60) for r in rng.sample(ids, 3)]
    env = env_for(
        broker,
        topics,
        RLHF_REWARD_RELIABILITY_MIN_VOTES="10",
        RLHF_REWARD_RELIABILITY_REFIT_EVERY="16",
        RLHF_REWARD_MAX_RESPONSE_CHARS="500",
        RLHF_CONTROL_TOKEN=TOKEN,
    )
    with run_service("reward", tmp_path, env=env) as svc, EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        wait_for(
            lambda: metric(svc, "rlhf_reward_quarantined_raters") >= 2, 180, "two raters quarantined", detail=svc.log
        )
        late = [vote("header:r0", 1000 + i, True) for i in range(3)]
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in late])
        consume(  # copied there while quarantined: held, not trained
            broker.bootstrap,
            topics.feedback_quarantine,
            events_pb2.Feedback,
            lambda es: {e.event_id for e in late} <= {e.event_id for e in es},
            group="release-test",
        )
        # an event of r0's on the quarantine topic that the trainer does not hold (as after a
        # restore from a checkpoint older than the copy): only the topic can bring it back
        lost = vote("header:r0", 2000, True)
        producer.publish_bytes(
            topics.feedback_quarantine, encode(lost), lost.conversation_id, {"quarantine.rater": b"header:r0"}
        )
        listed = raters(svc.address)  # answered between training iterations: the late batch is done
        assert {r for r, x in listed.items() if x.quarantined} == flippers
        assert listed["header:r0"].held_examples >= len(late)
        assert listed["header:r2"].weight > 0.5 and not listed["header:r2"].quarantined
        before = info(svc.address).examples_seen

        release = stub(svc.address).ReleaseRater
        request = reward_pb2.ReleaseRaterRequest(rater_id="header:r0")
        for metadata in ((), control_metadata("not-the-token")):
            with pytest.raises(grpc.RpcError) as refused:
                release(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert raters(svc.address)["header:r0"].quarantined, "a refused release changed nothing"
        with pytest.raises(grpc.RpcError) as not_quarantined:
            release(reward_pb2.ReleaseRaterRequest(rater_id="header:r2"), metadata=control_metadata(TOKEN), timeout=30)
        assert not_quarantined.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "header:r2" in not_quarantined.value.details()

        out = release(request, metadata=control_metadata(TOKEN), timeout=60)
        assert out.was_quarantined and out.rater_id == "header:r0"
        assert out.released_examples == listed["header:r0"].held_examples
        assert (out.replayed_events, out.replayed_examples) == (1, 1), "only the event the trainer did not hold"
        # the held examples that never trained (at least the late ones) and the replayed one train now,
        # with no new feedback arriving
        wait_for(
            lambda: info(svc.address).examples_seen >= before + len(late) + 1,
            120,
            "released examples trained",
            detail=svc.log,
        )
        after = raters(svc.address)["header:r0"]
        assert not after.quarantined and after.released and after.held_examples == 0
        assert "rater released by an operator" in svc.log_path.read_text()

        # the CLI: a listing needs no token; a release without one says what to set, with it releases
        capsys.readouterr()
        assert rlhf_main(["raters", "--reward", svc.address, "--state-dir", str(tmp_path)]) == 0
        shown = capsys.readouterr().out
        assert "header:r1: QUARANTINED" in shown and "header:r0: released" in shown
        assert "6 raters, 1 quarantined" in shown
        no_token = ["raters", "--reward", svc.address, "--state-dir", str(tmp_path), "--release", "header:r1"]
        assert rlhf_main(no_token) == 1
        assert "no control token" in capsys.readouterr().err
        argv = ["raters", "--reward", svc.address, "--token", TOKEN, "--release", "header:r1"]
        assert rlhf_main(argv) == 0
        assert "released header:r1 (was quarantined)" in capsys.readouterr().out
        assert not raters(svc.address)["header:r1"].quarantined
