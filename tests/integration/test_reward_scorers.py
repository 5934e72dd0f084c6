"""Reward scorer replicas (RLHF_REWARD_ROLE=scorer) beside one reward trainer, real broker,
real processes, tiny backbone, one shared reward store:

- a scorer started on an empty store serves version 0, with the trainer's own scores;
- feedback trains the trainer; the scorer loads each announced version and scores exactly
  as the trainer does (same raw and normalised scores, same rm_version);
- a scorer started later serves the newest version at once;
- a scorer that never sees an announcement (another topic prefix) catches up from the store;
- a false announcement (a version the store does not hold) is ignored and counted;
- rater control is the trainer's: a scorer refuses ListRaters with FAILED_PRECONDITION."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from rlhf.bus import EventProducer, new_event
from rlhf.testing.preferences import SyntheticPreference
from rlhf.v1 import events_pb2, reward_pb2
from tests.integration.test_reward_service import TINY, info, metric, score, stub
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow  # a trainer and three scorers as processes: ~2 min on 2 cores


def test_scorer_replicas_serve_the_trainers_versions(broker, topics, tmp_path):
    store = tmp_path / "rm-store"
    base = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_REWARD_STORE": str(store),
        **TINY,
    }
    scorer_env = {**base, "RLHF_REWARD_ROLE": "scorer", "RLHF_REWARD_FOLLOW_SECONDS": "600"}  # announcements only
    gen, held = SyntheticPreference(seed=1), SyntheticPreference(seed=2)
    items = [(p, r) for p, c, rj in (held.pair() for _ in range(20)) for r in (c, rj)]
    for d in ("trainer", "a", "b", "c"):
        (tmp_path / d).mkdir()

    with (
        run_service("reward", tmp_path / "trainer", env={**base, "RLHF_REWARD_PUBLISH_EVERY_STEPS": "5"}) as trainer,
        run_service("reward", tmp_path / "a", env=scorer_env) as a,
        run_service(
            "reward",
            tmp_path / "c",
            # never sees an announcement: only its look at the store, every second
            env={**scorer_env, "RLHF_TOPIC_PREFIX": topics.prefix + "-elsewhere", "RLHF_REWARD_FOLLOW_SECONDS": "1"},
        ) as c,
        EventProducer(broker.bootstrap) as producer,
    ):
        # 1. version 0 everywhere, the same scores (the same seeded head)
        assert info(a.address).rm_version == 0 and info(trainer.address).rm_version == 0
        fresh = list(score(trainer.address, items).raw_scores)
        assert list(score(a.address, items).raw_scores) == pytest.approx(fresh, abs=1e-6)

        # 2. the trainer learns; scorer a follows its announcements
        events = [gen.comparison_event() for _ in range(160)]
        producer.publish_many([(topics.feedback, e, e.conversation_id) for e in events])
        wait_for(lambda: info(trainer.address).pairs_seen == 160, 120, "160 pairs trained", detail=trainer.log)
        step = info(trainer.address).train_step
        states = tmp_path / "trainer" / "state-reward" / "reward" / "trainer"
        # the topic ran dry: a last version, then its checkpoint; nothing changes after it
        wait_for(lambda: list(states.glob(f"state-{step:09d}-*.pt")), 60, "the idle checkpoint", detail=trainer.log)
        version = info(trainer.address).rm_version
        assert version >= 2 and version == max(_versions(store))
        for scorer in (a, c):
            at = lambda s=scorer: info(s.address).rm_version == version  # noqa: E731
            wait_for(at, 60, f"scorer at v{version}", detail=scorer.log)
        ours, theirs = score(trainer.address, items), score(a.address, items)
        assert ours.rm_version == theirs.rm_version == version
        assert list(theirs.raw_scores) == pytest.approx(list(ours.raw_scores), abs=1e-6)
        assert list(theirs.scores) == pytest.approx(list(ours.scores), abs=1e-5)  # the version's normaliser
        assert list(theirs.raw_scores) != pytest.approx(fresh, abs=1e-3)  # trained: not version 0's scores
        got = info(a.address)
        assert got.pairs_seen > 0 and got.train_step > 0 and 0 < got.online_accuracy <= 1
        assert metric(a, "rlhf_rm_version") == version
        assert loads(a).get(("announcement", "loaded"), 0) >= 1, loads(a)
        assert loads(c).get(("store", "loaded"), 0) >= 1 and ("announcement", "loaded") not in loads(c), loads(c)

        # 3. a scorer started now serves the newest version from its first answer
        with run_service("reward", tmp_path / "b", env=scorer_env) as b:
            assert info(b.address).rm_version == version
            assert loads(b) == {("start", "loaded"): 1}, loads(b)

        # 4. an announcement of a version the store does not hold: ignored, counted, a serves on
        false = new_event(events_pb2.RewardModelUpdate, version=version + 100, sha256="0" * 64)
        producer.publish(topics.reward_updates, false, key="reward")
        wait_for(
            lambda: metric(a, 'rlhf_reward_scorer_updates_invalid_total{reason="not_in_store"}') == 1,
            30,
            "the false announcement counted",
            detail=a.log,
        )
        assert info(a.address).rm_version == version and "reward-model announcement ignored" in a.log(200)

        # 5. raters live in the trainer
        with pytest.raises(grpc.RpcError) as refused:
            stub(a.address).ListRaters(reward_pb2.ListRatersRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "scorer" in refused.value.details() and "reward trainer" in refused.value.details()
        assert not (tmp_path / "a" / "state-reward" / "reward" / "writer.lock").exists()  # it wrote nothing


def loads(svc) -> dict[tuple[str, str], float]:
    """rlhf_reward_scorer_loads_total of `svc` by (trigger, outcome)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    return {
        (s.labels["trigger"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(body)
        if family.name == "rlhf_reward_scorer_loads"
        for s in family.samples
        if s.name.endswith("_total")
    }


def _versions(store) -> list[int]:
    return [int(p.name[1:]) for p in store.glob("v[0-9]*") if (p / "manifest.json").exists()] or [0]
