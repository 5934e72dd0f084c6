"""Canary promotion in real processes, tiny models: `rlhf up --tiny` with canaries on, a
candidate trained by the loop, simulated users through the real gateway (rlhf.experiments.
canary.run_users), the real broker, the learner's controller, the generator serving two
versions. Run twice: users who give thumbs only, and users who only pick between two answers.

1. users whose taste dislikes the candidate → the learner rolls it back by itself; the
   candidate answered at most the configured share of the one-answer chats (measured, within
   three binomial standard deviations), and afterwards new conversations all get stable;
2. the next candidate, which users like → promoted by itself, and then 100 % of new
   conversations get it.

The users' taste is about versions, not words (a tiny random model's answers carry no taste):
what is tested is the path from a person's judgement of the version they were served to the
served set changing.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from rlhf.experiments.canary import Users, candidate_share, run_users, write_figure
from rlhf.serving.auth import control_token_from
from rlhf.serving.client import sync_channel
from rlhf.v1 import generation_pb2, generation_pb2_grpc, learner_pb2, learner_pb2_grpc
from tests.e2e.test_loop import FAST, _print_logs, stack  # noqa: F401 - the fixture
from tests.procs import wait_for

pytestmark = pytest.mark.slow

SHARE = 0.3
CANARY = {
    **FAST,
    "RLHF_ROLLOUT_MIN_RM_EXAMPLES": "0",  # rollouts (and so a candidate) without waiting for feedback
    "RLHF_CANARY_ENABLED": "true",
    "RLHF_CANARY_SHARE": str(SHARE),
    "RLHF_CANARY_MIN_EVENTS_PER_ARM": "12",
    "RLHF_CANARY_COMPARE_SHARE": "1.0",
    # versions trained while a canary runs are refused, not queued: after the rollback nothing
    # is in canary until the learner trains the next one
    "RLHF_CANARY_NEW_CANDIDATE": "reject",
}


def taste(likes: int, seed: int):
    """A user's score of an answer by the version that wrote it: uniform noise, +0.6 for the
    version they like — with thumbs up above 0.8, 80 % of its answers get a thumbs up and
    20 % of the other's; in a pick it wins 92 % of the time (P(U + 0.6 > U') = 1 − 0.4²/2)."""
    rng = random.Random(seed)
    return lambda prompt, response, version: rng.random() + (0.6 if version == likes else 0.0)


def _candidate(learner, generator, not_before: int = 0):
    """The canary once a candidate newer than `not_before` runs and the generator serves it."""
    status = wait_for(
        lambda: (
            (s := learner.GetCanary(learner_pb2.GetCanaryRequest(), timeout=30)).candidate_version > not_before and s
        ),
        400,
        "a candidate in canary",
        every=2,
    )
    learner.Pause(learner_pb2.PauseRequest(), timeout=600)  # no newer version queues behind it
    wait_for(
        lambda: (
            generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=30).candidate_version == status.candidate_version
        ),
        240,
        "the generator serving the candidate",
        every=1,
    )
    return learner.GetCanary(learner_pb2.GetCanaryRequest(), timeout=30)


def _versions_of_new_conversations(users: Users, n: int) -> set[int]:
    import httpx

    with httpx.Client(base_url=users.gateway, timeout=120) as client:
        out = set()
        for i in range(n):
            body = {"messages": [{"role": "user", "content": "Hi."}], "conversation_id": f"after-{i}", "max_tokens": 4}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            out.add(r.json()["policy_version"])
    return out


@pytest.mark.parametrize("stack", [CANARY], indirect=True)
@pytest.mark.parametrize("mode", ["thumbs", "pairwise"])
def test_users_roll_back_a_disliked_candidate_and_promote_a_liked_one(stack, mode):
    urls = stack["urls"]
    token = control_token_from(stack["state"])
    learner = learner_pb2_grpc.LearnerServiceStub(sync_channel(urls["learner"], control_token=token))
    generator = generation_pb2_grpc.GenerationServiceStub(sync_channel(urls["generator"]))
    try:
        # 1. a candidate users dislike
        status = _candidate(learner, generator)
        bad, stable = status.candidate_version, status.stable_version
        assert status.share == pytest.approx(SHARE)
        users = Users(urls["gateway"], learner, taste(likes=stable, seed=1), mode=mode, threshold=0.8, seed=1)
        decision, _ = run_users(users, bad, stable, max_feedback=1500, timeout=600)
        if os.environ.get("RLHF_CANARY_FIGURE_DIR"):  # docs/canary.md's figure comes from this run
            write_figure(
                Path(os.environ["RLHF_CANARY_FIGURE_DIR"]) / f"canary-rollback-{mode}.png", users.rows, decision
            )
        assert decision is not None and decision["verdict"] == "roll_back", decision
        assert decision["by"] == "rule" and decision["reason"] == "worse"
        during = [(t, v) for t, v in users.chats if v in (bad, stable)]
        measured = candidate_share(during, bad)
        assert 0 < measured <= SHARE + 3 * math.sqrt(SHARE * (1 - SHARE) / len(during)), (measured, len(during))
        wait_for(
            lambda: generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=30).candidate_version == 0,
            120,
            "the candidate dropped",
        )
        assert _versions_of_new_conversations(users, 20) == {stable}

        # 2. the next candidate, which users like: promoted, then every new conversation gets it
        learner.Resume(learner_pb2.ResumeRequest(), timeout=30)
        status = _candidate(learner, generator, not_before=bad)
        good = status.candidate_version
        assert status.stable_version == stable
        users = Users(urls["gateway"], learner, taste(likes=good, seed=2), mode=mode, threshold=0.8, seed=2)
        decision, _ = run_users(users, good, stable, max_feedback=1500, timeout=600)
        if os.environ.get("RLHF_CANARY_FIGURE_DIR"):
            write_figure(
                Path(os.environ["RLHF_CANARY_FIGURE_DIR"]) / f"canary-promote-{mode}.png", users.rows, decision
            )
        assert decision is not None and decision["verdict"] == "promote", decision
        wait_for(
            lambda: generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=30).policy_version == good,
            120,
            "the candidate served as stable",
        )
        assert _versions_of_new_conversations(users, 20) == {good}
    except BaseException:
        _print_logs(stack)
        raise
