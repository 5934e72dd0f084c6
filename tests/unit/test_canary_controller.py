"""The promotion controller (rlhf/canary/controller.py): state over a stream of feedback
records, the new-candidate policies, and the sticky traffic split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf.canary.config import CanaryConfig
from rlhf.canary.controller import Admission, CanaryController, FeedbackRecord, assign
from rlhf.canary.decision import Verdict
from rlhf.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]


def thumbs(version: int, up: bool, t: float) -> FeedbackRecord:
    return FeedbackRecord("thumbs", (version,), 1 if up else -1, t)


def run_thumbs(ctl: CanaryController, p: dict[int, float], *, seed: int, start: float = 0.0, limit: int = 20_000):
    """Thumbs from simulated users, half on each of the controller's two versions, until a
    verdict; returns (the deciding step, the time it came)."""
    rng = np.random.default_rng(seed)
    pair = (ctl.stable, ctl.candidate)
    for i in range(limit):
        version = pair[int(rng.random() < 0.5)]
        step = ctl.observe(thumbs(version, rng.random() < p[version], start + i))
        if step.decision.verdict is not Verdict.CONTINUE:
            return step, start + i
    raise AssertionError("no verdict")


# --- one canary, start to end -----------------------------------------------------------------


def test_a_better_candidate_is_promoted_and_the_next_canary_starts_fresh():
    ctl = CanaryController(stable=1)
    assert ctl.propose(2, now_seconds=0.0).action is Admission.STARTED
    step, t = run_thumbs(ctl, {1: 0.5, 2: 0.7}, seed=0)
    assert step.decision.verdict is Verdict.PROMOTE and step.decision.reason == "better"
    assert (ctl.stable, ctl.candidate) == (2, None)
    done = ctl.history[-1]
    assert (done.candidate, done.stable_before, done.stable_after, done.verdict) == (2, 1, 2, Verdict.PROMOTE)
    assert done.evidence["events"] == step.decision.evidence["events"] and done.ended_seconds == t
    assert done.evidence["thumbs_up_rate_candidate"] > done.evidence["thumbs_up_rate_stable"]

    assert ctl.propose(3, now_seconds=t + 1).action is Admission.STARTED
    fresh = ctl.decision()
    assert (fresh.evidence["stable"], fresh.evidence["candidate"], fresh.evidence["events"]) == (2, 3, 0)


def test_a_worse_candidate_is_rolled_back_and_stable_stays():
    ctl = CanaryController(stable=1)
    ctl.propose(2, now_seconds=0.0)
    step, _ = run_thumbs(ctl, {1: 0.6, 2: 0.35}, seed=1)
    assert (step.decision.verdict, step.decision.reason) == (Verdict.ROLL_BACK, "worse")
    assert (ctl.stable, ctl.candidate) == (1, None)
    assert ctl.history[-1].stable_after == 1


def test_head_to_head_comparisons_decide_and_ties_only_count():
    ctl = CanaryController(stable=1, config=CanaryConfig(min_events_per_arm=20))
    ctl.propose(2, now_seconds=0.0)
    for i in range(30):
        step = ctl.observe(FeedbackRecord("comparison", (2, 1), 0, float(i)))  # ties
    assert step.decision.evidence["ties"] == 30 and step.decision.evidence["log_e_promote"] == 0.0
    for i in range(200):
        chosen, rejected = (2, 1) if i % 4 else (1, 2)  # the candidate wins 3 in 4
        step = ctl.observe(FeedbackRecord("comparison", (chosen, rejected), 1, 30.0 + i))
        if step.decision.verdict is not Verdict.CONTINUE:
            break
    assert step.decision.verdict is Verdict.PROMOTE
    e = step.decision.evidence
    assert e["wins_candidate"] > e["wins_stable"] and e["ties"] == 30 and e["events"] == e["ties"] + i + 1
    assert ctl.stable == 2


def test_records_about_other_versions_or_times_are_ignored_and_counted():
    ctl = CanaryController(stable=1)
    assert ctl.observe(thumbs(1, True, 0.0)) is None  # no canary yet
    ctl.propose(2, now_seconds=100.0)
    assert ctl.observe(thumbs(1, True, 99.0)) is None  # given before the canary began
    assert ctl.observe(thumbs(7, True, 101.0)) is None  # an older version
    assert ctl.observe(FeedbackRecord("comparison", (2, 7), 1, 101.0)) is None  # not stable vs candidate
    assert ctl.observe(FeedbackRecord("comparison", (2, 2), 1, 101.0)) is None  # two answers of one version
    assert ctl.ignored == {"no_canary": 1, "before_canary": 1, "other_version": 1, "other_pair": 2}
    assert ctl.decision().evidence["events"] == 0
    assert ctl.observe(thumbs(2, True, 102.0)).decision.evidence["events"] == 1


def test_the_duration_limit_ends_a_quiet_canary_on_tick():
    ctl = CanaryController(stable=1, config=CanaryConfig(max_duration_seconds=600.0))
    ctl.propose(2, now_seconds=1000.0)
    ctl.observe(thumbs(2, True, 1010.0))
    assert ctl.tick(1599.0).decision.verdict is Verdict.CONTINUE
    step = ctl.tick(1600.0)
    assert (step.decision.verdict, step.decision.reason) == (Verdict.ROLL_BACK, "timeout_seconds")
    assert ctl.stable == 1 and ctl.candidate is None and ctl.history[-1].ended_seconds == 1600.0
    assert ctl.tick(5000.0) is None


def test_the_event_limit_rolls_back_an_undecided_canary():
    ctl = CanaryController(stable=1, config=CanaryConfig(max_events=120))
    ctl.propose(2, now_seconds=0.0)
    step, _ = run_thumbs(ctl, {1: 0.5, 2: 0.5}, seed=2)
    assert (step.decision.verdict, step.decision.reason) == (Verdict.ROLL_BACK, "timeout_events")
    assert step.decision.evidence["events"] == 120


def test_the_alert_is_raised_once_per_canary():
    ctl = CanaryController(stable=1, config=CanaryConfig(min_events_per_arm=400))
    ctl.propose(2, now_seconds=0.0)
    rng = np.random.default_rng(3)
    raised = []
    for i in range(600):
        version = 2 if i % 2 else 1
        step = ctl.observe(thumbs(version, rng.random() < (0.1 if version == 2 else 0.7), float(i)))
        raised.append(step.alert_raised)
    assert sum(raised) == 1 and step.decision.alert and step.decision.verdict is Verdict.CONTINUE


# --- new candidates while one is pending ------------------------------------------------------


def test_replace_ends_the_pending_candidate_as_rolled_back_and_starts_the_new_one():
    ctl = CanaryController(stable=1, config=CanaryConfig(new_candidate="replace"))
    ctl.propose(2, now_seconds=0.0)
    ctl.observe(thumbs(2, True, 1.0))
    p = ctl.propose(3, now_seconds=5.0)
    assert (p.action, p.displaced, ctl.candidate) == (Admission.REPLACED, 2, 3)
    assert "replace" in p.reason
    gone = ctl.history[-1]
    assert (gone.candidate, gone.verdict, gone.reason) == (2, Verdict.ROLL_BACK, "replaced by version 3")
    assert gone.evidence["events"] == 1
    assert ctl.decision().evidence["events"] == 0 and ctl.decision().evidence["started_seconds"] == 5.0


def test_queue_starts_the_next_candidate_when_the_pending_one_is_decided():
    ctl = CanaryController(stable=1, config=CanaryConfig(new_candidate="queue", queue_limit=1))
    ctl.propose(2, now_seconds=0.0)
    assert ctl.propose(3, now_seconds=1.0).action is Admission.QUEUED
    full = ctl.propose(4, now_seconds=2.0)
    assert full.action is Admission.REJECTED and "queue_limit=1" in full.reason
    assert (ctl.candidate, ctl.queued) == (2, (3,))
    step, t = run_thumbs(ctl, {1: 0.5, 2: 0.75}, seed=4, start=10.0)
    assert step.decision.verdict is Verdict.PROMOTE and step.next_candidate == 3
    assert (ctl.stable, ctl.candidate, ctl.queued) == (2, 3, ())
    assert ctl.decision().evidence["started_seconds"] == t and ctl.decision().evidence["events"] == 0


def test_reject_refuses_a_new_candidate_and_keeps_the_pending_one():
    ctl = CanaryController(stable=1, config=CanaryConfig(new_candidate="reject"))
    ctl.propose(2, now_seconds=0.0)
    p = ctl.propose(3, now_seconds=1.0)
    assert p.action is Admission.REJECTED and "new_candidate=reject" in p.reason
    assert (ctl.candidate, ctl.queued, ctl.history) == (2, (), [])


def test_proposing_the_stable_or_a_pending_version_is_an_error():
    ctl = CanaryController(stable=1)
    with pytest.raises(InvalidArgument, match="candidate: version 1 is the stable version"):
        ctl.propose(1, now_seconds=0.0)
    ctl.propose(2, now_seconds=0.0)
    with pytest.raises(InvalidArgument, match="candidate: version 2 is already pending"):
        ctl.propose(2, now_seconds=0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "stars", "versions": (1,), "value": 1}, "kind: 'stars'"),
        ({"kind": "thumbs", "versions": (1, 2), "value": 1}, "versions: thumbs names 1 version"),
        ({"kind": "thumbs", "versions": (1,), "value": 0}, r"value: 0 for thumbs, expected one of \(1, -1\)"),
        ({"kind": "comparison", "versions": (1, 2), "value": -1}, r"value: -1 for comparison"),
    ],
)
def test_a_bad_record_names_the_field(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        FeedbackRecord(timestamp_seconds=0.0, **kwargs)
    with pytest.raises(InvalidArgument, match="timestamp_seconds: nan"):
        FeedbackRecord("thumbs", (1,), 1, float("nan"))


def test_snapshot_is_json_ready():
    ctl = CanaryController(stable=1)
    ctl.propose(2, now_seconds=0.0)
    ctl.propose(3, now_seconds=0.0)
    ctl.observe(thumbs(1, False, 3.0))
    snap = json.loads(json.dumps(ctl.snapshot(now_seconds=4.0), allow_nan=False))
    assert (snap["stable"], snap["candidate"], snap["queued"]) == (1, 2, [3])
    assert snap["evidence"]["elapsed_seconds"] == 4.0 and snap["evidence"]["thumbs_down_stable"] == 1


# --- the sticky split ---------------------------------------------------------------------------


IDS = [f"conv-{i}" for i in range(10_000)]


def test_assign_is_sticky_and_bounded_by_share_zero_and_one():
    assert [assign(c, 0.3, stable=1, candidate=2) for c in IDS[:500]] == [
        assign(c, 0.3, stable=1, candidate=2) for c in IDS[:500]
    ]
    assert {assign(c, 0.0, stable=1, candidate=2) for c in IDS} == {1}
    assert {assign(c, 1.0, stable=1, candidate=2) for c in IDS} == {2}
    assert {assign(c, 0.5, stable=1, candidate=None) for c in IDS[:100]} == {1}


def test_assign_measured_share_is_within_binomial_tolerance():
    for share in (0.1, 0.5):
        measured = np.mean([assign(c, share, stable=1, candidate=2) == 2 for c in IDS])
        tolerance = 4 * np.sqrt(share * (1 - share) / len(IDS))  # 4 standard deviations: 0.012 at 10 %
        assert abs(measured - share) <= tolerance, (share, measured)


def test_raising_the_share_only_moves_conversations_to_the_candidate():
    previous = set()
    for share in (0.0, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0):
        on_candidate = {c for c in IDS if assign(c, share, stable=1, candidate=2) == 2}
        assert previous <= on_candidate
        previous = on_candidate
    assert len(previous) == len(IDS)


def test_assign_agrees_across_processes_whatever_the_hash_seed():
    """Python's `hash` of a string changes per process; the split must not."""
    code = (
        "from rlhf.canary.controller import assign\n"
        "print([assign(f'conv-{i}', 0.3, stable=1, candidate=2) for i in range(300)])"
    )
    here = [assign(c, 0.3, stable=1, candidate=2) for c in IDS[:300]]
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        assert json.loads(out) == here


def test_assign_refuses_a_share_outside_zero_one():
    with pytest.raises(InvalidArgument, match=r"share: 1.5 is outside \[0, 1\]"):
        assign("c", 1.5, stable=1, candidate=2)
    with pytest.raises(InvalidArgument, match=r"share: nan"):
        assign("c", float("nan"), stable=1, candidate=2)
    with pytest.raises(InvalidArgument, match="conversation_id"):
        assign("", 0.5, stable=1, candidate=2)
