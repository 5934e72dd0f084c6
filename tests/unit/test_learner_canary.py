"""The learner's canary plane (rlhf/learner/canary.py) without Kafka: Feedback events become
the controller's records, decisions become announced changes, and the state a checkpoint
stores, replayed, reaches the same decision on the same record."""

from __future__ import annotations

import json
import random

import pytest

from rlhf.bus import new_event
from rlhf.bus.consumer import Record
from rlhf.canary import FeedbackRecord
from rlhf.errors import FailedPrecondition, InvalidArgument
from rlhf.learner.canary import CanaryPlane, LearnerCanaryConfig, feedback_record, wilson
from rlhf.v1 import events_pb2

T0 = 1_700_000_000.0


def config(**kw) -> LearnerCanaryConfig:
    return LearnerCanaryConfig(enabled=True, min_events_per_arm=10, **kw)


def rating(version: int, up: bool, t: float):
    return new_event(
        events_pb2.Feedback,
        created_unix_ms=int(t * 1000),
        conversation_id="c",
        rating=events_pb2.Rating(response_id="r", response="x", value=1 if up else -1, policy_version=version),
    )


def comparison(chosen: int, rejected: int, t: float):
    return new_event(
        events_pb2.Feedback,
        created_unix_ms=int(t * 1000),
        conversation_id="c",
        comparison=events_pb2.Comparison(
            chosen_id="a",
            chosen="x",
            rejected_id="b",
            rejected="y",
            chosen_policy_version=chosen,
            rejected_policy_version=rejected,
        ),
    )


def records(events, start: int = 0, topic: str = "rlhf.feedback"):
    return [Record(topic, 0, start + i, None, e, {}, b"") for i, e in enumerate(events)]


def thumbs_stream(p_stable: float, p_candidate: float, n: int, seed: int, stable: int = 0, candidate: int = 1):
    """n ratings, half on each version, thumbs up with the version's rate."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = candidate if rng.random() < 0.5 else stable
        p = p_candidate if v == candidate else p_stable
        out.append(rating(v, rng.random() < p, T0 + 1 + i))
    return out


def test_feedback_events_become_records_or_a_reason():
    assert feedback_record(rating(3, True, T0)) == FeedbackRecord("thumbs", (3,), 1, T0)
    assert feedback_record(rating(3, False, T0)).value == -1
    assert feedback_record(comparison(2, 1, T0)) == FeedbackRecord("comparison", (2, 1), 1, T0)
    assert feedback_record(comparison(2, 2, T0)) == "same_version"
    assert feedback_record(new_event(events_pb2.Feedback, conversation_id="c")) == "no_kind"
    bad = rating(1, True, T0)
    bad.rating.value = 5
    assert feedback_record(bad) == "bad_value"


def test_a_liked_candidate_is_promoted_and_announced_with_its_evidence():
    plane = CanaryPlane.new(config(), stable=0)
    start = plane.propose(1, T0)
    assert (start.kind, start.version, start.stable, start.candidate) == ("canary", 1, 0, 1)
    changes = plane.observe(records(thumbs_stream(0.2, 0.9, 400, seed=1)))
    [decided] = changes
    assert (decided.kind, decided.version, decided.stable, decided.candidate) == ("promoted", 1, 1, 0)
    assert decided.decision["verdict"] == "promote" and decided.decision["by"] == "rule"
    ev = decided.decision["evidence"]
    assert ev["reason"] == "better" and ev["log_e_promote"] >= ev["log_threshold_promote"]
    assert plane.stable == 1 and plane.candidate == 0
    assert plane.status()["last_decision"]["candidate"] == 1


def test_a_disliked_candidate_is_rolled_back_and_stable_stays():
    plane = CanaryPlane.new(config(), stable=4)
    plane.propose(7, T0)
    [decided] = plane.observe(records(thumbs_stream(0.8, 0.1, 400, seed=2, stable=4, candidate=7)))
    assert (decided.kind, decided.version, decided.stable, decided.candidate) == ("rolled_back", 4, 4, 0)
    assert decided.decision["verdict"] == "roll_back"


def test_head_to_head_alone_decides():
    plane = CanaryPlane.new(config(), stable=0)
    plane.propose(1, T0)
    rng = random.Random(3)
    stream = [comparison(*((1, 0) if rng.random() < 0.85 else (0, 1)), T0 + 1 + i) for i in range(300)]
    changes = plane.observe(records(stream))
    assert [c.kind for c in changes] == ["promoted"]
    assert changes[0].decision["evidence"]["wins_candidate"] > changes[0].decision["evidence"]["wins_stable"]


def test_the_checkpointed_state_replays_to_the_same_decision():
    stream = records(thumbs_stream(0.3, 0.8, 600, seed=4))
    whole = CanaryPlane.new(config(), stable=0)
    whole.propose(1, T0)
    decided_at = next(i for i, r in enumerate(stream) if whole.observe([r]))
    # stop halfway, store, restore (through JSON, as the checkpoint does) and read on
    part = CanaryPlane.new(config(), stable=0)
    part.propose(1, T0)
    assert part.observe(stream[: decided_at // 2]) == []
    restored, replayed = CanaryPlane.from_json(config(), json.loads(json.dumps(part.to_json())))
    assert replayed == [] and restored.candidate == 1
    assert restored.evidence() == part.evidence()
    # a consumer that seeks back re-reads nothing twice: offsets below the stored ones are skipped
    assert restored.observe(stream[: decided_at // 2]) == []
    assert restored.evidence() == part.evidence()
    later = [i for i, r in enumerate(stream[decided_at // 2 :], start=decided_at // 2) if restored.observe([r])]
    assert later[0] == decided_at
    assert restored.history[-1]["evidence"] == whole.history[-1]["evidence"]


def test_new_candidates_queue_and_start_when_the_running_one_is_decided():
    plane = CanaryPlane.new(config(queue_limit=1), stable=0)
    plane.propose(1, T0)
    assert plane.propose(2, T0 + 0.5).kind == "queued"
    assert plane.propose(3, T0 + 0.6).kind == "rejected"  # queue_limit=1
    assert plane.propose(2, T0 + 0.7).kind == "queued"  # proposed again after a crash: same answer
    changes = plane.observe(records(thumbs_stream(0.8, 0.1, 400, seed=5)))
    assert [(c.kind, c.version, c.candidate) for c in changes] == [("rolled_back", 0, 0), ("canary", 2, 2)]
    assert plane.candidate == 2 and plane.queued == ()


def test_replace_policy_ends_the_pending_candidate():
    plane = CanaryPlane.new(config(new_candidate="replace"), stable=0)
    plane.propose(1, T0)
    change = plane.propose(2, T0 + 1)
    assert (change.kind, change.candidate) == ("canary", 2)
    assert plane.history[-1]["candidate"] == 1 and plane.history[-1]["by"] == "replaced"


def test_operator_actions():
    plane = CanaryPlane.new(config(), stable=0)
    plane.propose(1, T0)
    plane.propose(2, T0 + 1)
    with pytest.raises(FailedPrecondition, match="promote or roll it back"):
        plane.set_enabled(False, stable=0)
    with pytest.raises(InvalidArgument, match="share"):
        plane.set_share(1.5)
    assert plane.set_share(0.3).kind == "canary" and plane.share == 0.3
    changes = plane.promote(1, T0 + 2)
    assert [(c.kind, c.version, c.stable, c.candidate) for c in changes] == [
        ("promoted", 1, 1, 0),
        ("canary", 2, 1, 2),  # the queued one starts against the new stable
    ]
    assert plane.history[-1]["by"] == "operator"
    with pytest.raises(FailedPrecondition, match="already the stable"):
        plane.promote(1, T0 + 3)
    back = plane.rolled_back(0, T0 + 4)
    assert (back.kind, back.stable, back.candidate) == ("rolled_back", 0, 0) and plane.queued == ()
    plane.set_enabled(False, stable=0)
    with pytest.raises(FailedPrecondition, match="canaries are off"):
        plane.propose(3, T0 + 5)


def test_metrics_export_and_wilson():
    lo, hi = wilson(8, 10)
    assert 0.49 < lo < 0.8 < hi < 0.95
    assert wilson(0, 5)[0] == pytest.approx(0.0, abs=1e-12) and wilson(5, 5)[1] == pytest.approx(1.0)
    plane = CanaryPlane.new(config(), stable=0)
    plane.propose(1, T0)
    plane.observe(records([rating(1, True, T0 + 1), rating(0, False, T0 + 2)]))
    plane.export()
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("rlhf_learner_canary_candidate_version") == 1
    assert REGISTRY.get_sample_value("rlhf_learner_canary_thumbs", {"role": "candidate", "value": "up"}) == 1
    assert REGISTRY.get_sample_value("rlhf_learner_canary_thumbs_up_ratio", {"role": "stable"}) == 0.0


@pytest.mark.skipif(
    "outcome" not in events_pb2.Comparison.DESCRIPTOR.fields_by_name, reason="Feedback carries no tie yet"
)
def test_a_tie_or_both_bad_is_a_comparison_neither_version_won():
    for name in ("COMPARISON_OUTCOME_TIE", "COMPARISON_OUTCOME_BOTH_BAD"):
        event = comparison(2, 1, T0)
        event.comparison.outcome = getattr(events_pb2, name)
        assert feedback_record(event) == FeedbackRecord("comparison", (2, 1), 0, T0)
    event = comparison(2, 1, T0)
    event.comparison.outcome = events_pb2.COMPARISON_OUTCOME_CHOSEN
    assert feedback_record(event).value == 1
