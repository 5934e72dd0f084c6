"""The reward service with RLHF_REWARD_LENGTH_DEBIAS, through the real broker, tiny
backbone: a state dir trained with debias none restarts with odin (the served head is the
trained one, the length head starts fresh) and keeps training; `rlhf eval`'s controlled-pair
report (probe_round) scores both sides through Score."""

from __future__ import annotations

import pytest

from rlhf.bus import EventProducer
from rlhf.experiments.evaluate import probe_round
from rlhf.serving.client import sync_channel
from rlhf.testing.preferences import SyntheticPreference
from rlhf.v1 import reward_pb2_grpc
from tests.integration.test_reward_service import env_for, info, score
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow  # two service starts and RM training: ~1 min on 2 cores

ANSWERS = [
    "Tea is easy. Boil water and steep it. Enjoy!",
    "A river is flowing water. Want to know more?",
    "Mountains are tall. Please bring a coat.",
]
PROMPTS = ["How do I make tea?", "What is a river?", "Tell me about mountains."]


def test_debias_none_to_odin_keeps_the_state_dir_and_probes_score_through_grpc(broker, topics, tmp_path):
    gen = SyntheticPreference(seed=4)
    first, second = [gen.comparison_event() for _ in range(32)], [gen.comparison_event() for _ in range(32)]
    held = [(gen.prompt(), gen.response(True)) for _ in range(4)]
    env = env_for(broker, topics, RLHF_REWARD_PUBLISH_EVERY_STEPS="1")
    with EventProducer(broker.bootstrap) as producer:
        with run_service("reward", tmp_path, env=env) as svc:
            producer.publish_many([(topics.feedback, e, e.conversation_id) for e in first])
            wait_for(
                lambda: (i := info(svc.address)).pairs_seen == 32 and i.rm_version == i.train_step,
                120,
                "32 pairs trained, the last step published",
                detail=svc.log,
            )
            before = list(score(svc.address, held).raw_scores)
            version = info(svc.address).rm_version
            assert svc.stop() == 0  # graceful: checkpointed
        with run_service("reward", tmp_path, env={**env, "RLHF_REWARD_LENGTH_DEBIAS": "odin"}) as svc:
            restored = info(svc.address)
            assert restored.pairs_seen == 32 and restored.rm_version == version
            # the quality head is the trained head: the served scores did not move
            assert list(score(svc.address, held).raw_scores) == pytest.approx(before, abs=1e-5)
            assert "no ODIN length head: it starts fresh" in svc.log(100_000)
            producer.publish_many([(topics.feedback, e, e.conversation_id) for e in second])
            wait_for(lambda: info(svc.address).pairs_seen == 64, 120, "64 pairs trained", detail=svc.log)
            assert info(svc.address).rm_version > version

            with sync_channel(svc.address) as ch:
                report = probe_round(
                    reward_pb2_grpc.RewardServiceStub(ch), "prefers_question_ending", PROMPTS, ANSWERS, seed=0
                )
    assert report["rm_probe_property_pairs"] == 3 and report["rm_probe_length_pairs"] == 3
    assert 0.0 <= report["rm_probe_property_accuracy"] <= 1.0 and 0.0 <= report["rm_probe_longer_wins"] <= 1.0
    assert report["rm_probe_score_per_10_words"] == pytest.approx(report["rm_probe_score_per_10_words"])  # not nan
