"""Feedback you can trust, on the reward side: ties train as ties, both-bad as two
thumbs-down, a changed vote retracts the old one (counts, buffer and loss), rater
reliability (one-coin Dawid-Skene) finds label flippers, and quarantine is reversible."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, resolve_backbone
from rlhf.reward.data import PAIR, POINT, TIE, FeedbackConverter
from rlhf.reward.loss import bradley_terry_loss, tie_loss
from rlhf.reward.reliability import RaterReliability, ReliabilityConfig, Vote
from rlhf.v1 import common_pb2, events_pb2

TIE_OUTCOME = events_pb2.COMPARISON_OUTCOME_TIE
BOTH_BAD = events_pb2.COMPARISON_OUTCOME_BOTH_BAD


def comparison(event_id, a, b, outcome=events_pb2.COMPARISON_OUTCOME_CHOSEN, rater="", prompt="hi", **extra):
    return events_pb2.Feedback(
        schema_version=1,
        event_id=event_id,
        prompt=[common_pb2.ChatMessage(role="user", content=prompt)],
        comparison=events_pb2.Comparison(chosen=a, rejected=b, outcome=outcome),
        rater_id=rater,
        **extra,
    )


def rating(event_id, response, value, rater="", prompt="hi", **extra):
    return events_pb2.Feedback(
        schema_version=1,
        event_id=event_id,
        prompt=[common_pb2.ChatMessage(role="user", content=prompt)],
        rating=events_pb2.Rating(response=response, value=value),
        rater_id=rater,
        **extra,
    )


# ---- losses and conversion ------------------------------------------------------------------


def test_tie_loss_is_bradley_terry_with_target_one_half():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    loss, stats = tie_loss(a, b)
    expected = [-0.5 * (math.log(1 / (1 + math.exp(-m))) + math.log(1 / (1 + math.exp(m)))) for m in (0.0, 3.0)]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert stats["tie_gap"].item() == pytest.approx(1.5)
    # minimal at equal scores, and the gradient pulls the two together
    x = torch.tensor([1.0], requires_grad=True)
    tie_loss(x, torch.tensor([0.0]))[0].backward()
    assert x.grad.item() > 0  # descent lowers the higher one
    # weights: a weighted mean, a weight of 0 removes the example
    w_loss, _ = bradley_terry_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert w_loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-5)


def test_ties_and_both_bad_reach_the_rm_as_such():
    conv = FeedbackConverter()
    kind, (ex,), problem = conv.convert(comparison("e1", "x", "y", TIE_OUTCOME, rater="r"))
    assert problem is None and kind == "tie" and ex.kind == TIE and ex.rater == "r"
    kind, examples, _ = conv.convert(comparison("e2", "x", "y", BOTH_BAD))
    assert kind == "both_bad" and [(e.kind, e.response, e.label) for e in examples] == [
        (POINT, "x", -1),
        (POINT, "y", -1),
    ]
    kind, (ex,), _ = conv.convert(comparison("e3", "x", "y"))
    assert kind == "comparison" and ex.kind == PAIR


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return resolve_backbone("tiny", cache_dir=tmp_path_factory.mktemp("rm"))


def trainer_for(tiny_backbone, enabled=True, replay_ratio=1.0, **reliability) -> OnlineRewardTrainer:
    torch.manual_seed(0)
    model = load_reward_model(tiny_backbone, max_tokens=32)
    cfg = TrainerConfig(lr=1e-3, train_batch_size=8, replay_ratio=replay_ratio)
    return OnlineRewardTrainer(model, cfg, ReliabilityConfig(enabled=enabled, **reliability))


def gap(trainer, a: str, b: str) -> float:
    s = trainer.model.score([(("user", "hi"),)] * 2, [a, b])
    return abs(float(s[0] - s[1]))


def test_ties_train_as_ties(tiny_backbone):
    """Preferences first drive two answers apart; ties on them then pull them together
    (no replay here, so that only the ties train)."""
    tr = trainer_for(tiny_backbone, enabled=False, replay_ratio=0.0)
    a, b = "the cat sat on the mat please", "dogs run far away"
    list(tr.train(tr.ingest([comparison(f"p{i}", a, b) for i in range(16)]).examples))
    apart = gap(tr, a, b)
    ingested = tr.ingest([comparison(f"t{i}", a, b, TIE_OUTCOME) for i in range(48)])
    assert ingested.kinds == {"tie": 48} and {e.kind for e in ingested.examples} == {TIE}
    stats = list(tr.train(ingested.examples))
    assert "tie_loss" in stats[0] and "bt_loss" not in stats[0]
    assert gap(tr, a, b) < apart / 2 and stats[-1]["tie_gap"] < stats[0]["tie_gap"], (apart, gap(tr, a, b))


def test_a_changed_vote_retracts_the_old_one(tiny_backbone):
    tr = trainer_for(tiny_backbone, enabled=False)
    first = [rating("up-1", "a fine answer", 1, rater="r1"), comparison("c-1", "good", "bad", rater="r1")]
    list(tr.train(tr.ingest(first).examples))
    assert tr.examples_seen == 2 and tr.pairs_seen == 1 and len(tr.buffer) == 2
    buffer_loss = lambda: tr._loss(list(tr.buffer), tr._scores(list(tr.buffer)))[0].item()  # noqa: E731
    before = buffer_loss()
    # r1 changes the comparison: it now prefers the other answer
    changed = tr.ingest([comparison("c-2", "bad", "good", rater="r1", supersedes_event_id="c-1")])
    assert changed.retracted == 1 and tr.retracted == 1
    assert tr.examples_seen == 1 and tr.pairs_seen == 0  # the old pair no longer counts
    assert [e.event_id for e in tr.buffer] == ["up-1"]  # and is never replayed
    assert buffer_loss() != pytest.approx(before)  # the loss over what the RM keeps changed
    list(tr.train(changed.examples))
    assert tr.examples_seen == 2 and tr.pairs_seen == 1
    assert sorted(e.event_id for e in tr.buffer) == ["c-2", "up-1"]
    # another rater cannot retract r1's vote; a superseded event arriving late is dropped
    assert tr.ingest([rating("x-1", "a fine answer", -1, rater="r2", supersedes_event_id="up-1")]).retracted == 0
    tr.retract("never-seen", "r1")
    assert tr.ingest([rating("never-seen", "q", 1, rater="r1")]).kinds == {"superseded": 1}


def test_a_vote_retracted_in_the_same_batch_never_trains(tiny_backbone):
    tr = trainer_for(tiny_backbone, enabled=False)
    ingested = tr.ingest(
        [rating("v1", "answer", 1, rater="r1"), rating("v2", "answer", -1, rater="r1", supersedes_event_id="v1")]
    )
    assert [e.event_id for e in ingested.examples] == ["v2"] and ingested.retracted == 1
    list(tr.train(ingested.examples))
    assert tr.examples_seen == 1 and [e.label for e in tr.buffer] == [-1]


# ---- reliability ----------------------------------------------------------------------------


def synthetic_votes(rng, raters, flippers, items, per_item, accuracy=0.95):
    votes = []
    for i in range(items):
        truth = rng.choice((1, -1))
        for r in rng.sample(raters, per_item):
            right = rng.random() < accuracy
            v = truth if right else -truth
            votes.append(Vote(r, f"item{i}", -v if r in flippers else v, 0.5, f"{r}-{i}"))
    return votes


def test_dawid_skene_finds_label_flippers_from_agreement_alone():
    rng = random.Random(0)
    raters = [f"r{i:02d}" for i in range(20)]
    flippers = set(raters[:5])  # 25 %
    rel = RaterReliability(ReliabilityConfig(refit_every=10**9))
    rel.observe(synthetic_votes(rng, raters, flippers, items=240, per_item=3))
    newly_in, _ = rel.refit()
    assert newly_in == flippers == rel.quarantined
    assert all(rel.accuracy[r] < 0.2 for r in flippers) and all(rel.accuracy[r] > 0.8 for r in set(raters) - flippers)
    assert rel.weight("r00") == 0 and rel.weight("r10") > 0.6 and rel.weight("") == 1.0
    # a trusted rater is never quarantined; disabled, everyone weighs 1
    trusted = RaterReliability(ReliabilityConfig(trusted=["r00"]))
    trusted.votes = rel.votes
    trusted.refit()
    assert "r00" not in trusted.quarantined and "r01" in trusted.quarantined
    assert RaterReliability(ReliabilityConfig(enabled=False)).weight("anyone") == 1.0


def test_the_rm_prediction_decides_lone_votes():
    """No shared items: a rater is judged against the RM's held-out predictions."""
    rel = RaterReliability(ReliabilityConfig(refit_every=10**9))
    rel.observe([Vote("good", f"g{i}", 1, 0.8) for i in range(30)] + [Vote("bad", f"b{i}", -1, 0.8) for i in range(30)])
    rel.refit()
    assert rel.quarantined == {"bad"} and rel.accuracy["good"] > 0.7


def test_quarantine_is_reversible(tiny_backbone):
    """A flipper's examples leave the buffer and are held; when their votes turn honest they
    are released and the held examples train again; an operator can release too."""
    tr = trainer_for(tiny_backbone, refit_every=8, min_votes=6)
    honest = [f"h{i}" for i in range(5)]

    def round_of(n, flipper_honest: bool, start: int):
        events = []
        for i in range(start, start + n):
            good, bad = f"good answer {i} please", f"bad {i}"
            for r in honest[:2] + ["f"]:
                flip = r == "f" and not flipper_honest
                a, b = (bad, good) if flip else (good, bad)
                events.append(comparison(f"{r}-{i}", a, b, rater=r, prompt=f"q{i}"))
        return events

    ingested = tr.ingest(round_of(12, flipper_honest=False, start=0))
    list(tr.train(ingested.examples))
    assert "f" in tr.reliability.quarantined
    assert not any(e.rater == "f" for e in tr.buffer) and tr.held["f"]
    quarantined_events = tr.ingest(round_of(1, flipper_honest=False, start=100)).quarantined
    assert len(quarantined_events) == 1  # the loop copies it to the quarantine topic
    # the same rater now votes like the others: reliability recovers, they are released
    for start in range(200, 200 + 12 * 6, 12):
        list(tr.train(tr.ingest(round_of(12, flipper_honest=True, start=start)).examples))
        if "f" not in tr.reliability.quarantined:
            break
    assert "f" not in tr.reliability.quarantined and "f" not in tr.held
    list(tr.train(tr.ingest(round_of(4, flipper_honest=True, start=900)).examples))
    assert any(e.rater == "f" for e in tr.buffer)  # their held examples trained again

    # an operator's release, and the state in a checkpoint
    tr.reliability.quarantined.add("h4")
    tr.held["h4"] = [tr.buffer.sample(1)[0]]
    assert tr.release("h4") == 1 and "h4" not in tr.reliability.quarantined and tr.pending
    again = trainer_for(tiny_backbone, refit_every=8, min_votes=6)
    again.load_state_dict(tr.state_dict())
    assert again.reliability.accuracy == tr.reliability.accuracy and len(again.pending) == len(tr.pending)
    assert again.reliability.released == {"h4"} and again.retracted == tr.retracted
