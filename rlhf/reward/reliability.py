"""How far to trust each rater: reliability estimated online, weights, quarantine.

The model is the one-coin Dawid-Skene model (Dawid & Skene 1979, "Maximum Likelihood
Estimation of Observer Error-Rates Using the EM Algorithm"; the one-coin form as in MACE,
Hovy et al. 2013, "Learning Whom to Trust with MACE"): rater r gives the true answer of a
binary item with probability p_r and the other one otherwise, whatever the item. The
items' true answers are unknown; as in Raykar et al. 2010 ("Learning From Crowds"), the
reward model being trained is part of the evidence: its *held-out* prediction (the
progressive-validation score, taken before it trained on the label) is each item's prior.

An item is a comparison of two answers to one prompt (unordered: the vote says which of
the two the rater preferred) or one rated answer (the vote is the thumb). Ties, both-bad
and named scores are not votes: they are weighed by their rater's reliability but do not
estimate it.

EM over a sliding window of the latest votes, refitted every `refit_every` new votes:
    E: q_i = σ( λ·logit(prior_i) + Σ_{r votes on i} v_{ri} · logit(p_r) )   P(item i's answer is +1)
    M: p_r = (a + Σ_i agree_{ri}) / (a + b + n_r),   agree = q_i if v = +1 else 1 − q_i
with a Beta(a, b) prior on p_r (mean `prior_accuracy`, weight `prior_strength` votes), so a
rater with few votes stays near the prior. Items with several raters (two raters shown the
same pair) weigh most; a lone vote is judged against the RM alone.

Weights: w_r = clip(2 p_r − 1, 0, 1), the expected sign of the rater's vote (a coin-flipper
weighs 0, a perfect rater 1); anonymous events weigh `anonymous_weight`. Quarantine: a
rater with at least `min_votes` votes and p_r < `threshold` weighs 0 and their events are
held aside (rlhf/reward/trainer.py); released again once p_r ≥ threshold + `hysteresis`
(their votes keep being observed while quarantined), or by an operator (`release`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field


class ReliabilityConfig(BaseModel):
    """Rater reliability (part of TrainerConfig, prefix reliability_)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="weigh examples by rater reliability and quarantine unreliable raters")
    threshold: float = Field(0.5, description="quarantine a rater whose estimated accuracy falls below this")
    hysteresis: float = Field(0.1, description="release a quarantined rater once accuracy ≥ threshold + this")
    min_votes: int = Field(20, description="votes a rater needs before they can be quarantined")
    prior_accuracy: float = Field(0.75, description="Beta prior mean of a rater's accuracy")
    prior_strength: float = Field(4.0, description="Beta prior weight, in votes")
    rm_prior_weight: float = Field(1.0, description="λ: how much the RM's held-out prediction counts as evidence")
    window: int = Field(20_000, description="latest votes the EM fits over")
    refit_every: int = Field(32, description="refit the EM after this many new votes")
    iterations: int = Field(10, description="EM iterations per refit")
    anonymous_weight: float = Field(1.0, description="weight of anonymous feedback (no rater to estimate)")
    trusted: list[str] = Field(default_factory=list, description="rater ids never quarantined (operators, experts)")


@dataclass(frozen=True)
class Vote:
    rater: str
    item: str  # comparison: prompt key + both answers, unordered; rating: prompt key + answer
    vote: int  # +1 / −1 (for a comparison: +1 when the first answer in sorted order won)
    prior: float  # the RM's held-out P(answer = +1)
    event_id: str = ""


def _logit(p: float, eps: float = 1e-4) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RaterReliability:
    """The one-coin Dawid-Skene estimate over a window of votes, with quarantine state."""

    def __init__(self, cfg: ReliabilityConfig):
        self.cfg = cfg
        self.votes: deque[Vote] = deque(maxlen=cfg.window)
        self.accuracy: dict[str, float] = {}  # rater → p_r at the last refit
        self.counts: dict[str, int] = {}  # rater → votes in the window at the last refit
        self.quarantined: set[str] = set()
        self.released: set[str] = set()  # by an operator: not quarantined again until they vote worse anew
        self._since_refit = 0
        self.refits = 0

    # ---- votes -------------------------------------------------------------------------

    def observe(self, votes: Iterable[Vote]) -> tuple[set[str], set[str]]:
        """Add votes; refit when due. Returns (newly quarantined, newly released) raters."""
        n = 0
        for v in votes:
            if v.rater:
                self.votes.append(v)
                n += 1
        self._since_refit += n
        if n and self._since_refit >= self.cfg.refit_every:
            return self.refit()
        return set(), set()

    def refit(self) -> tuple[set[str], set[str]]:
        """Run EM over the window; update quarantine. Returns (newly quarantined, newly released)."""
        cfg = self.cfg
        self._since_refit = 0
        self.refits += 1
        items: dict[str, list[Vote]] = {}
        for v in self.votes:
            items.setdefault(v.item, []).append(v)
        raters = {v.rater for v in self.votes}
        p = {r: cfg.prior_accuracy for r in raters}
        count: dict[str, int] = {}
        a = cfg.prior_accuracy * cfg.prior_strength
        b = (1 - cfg.prior_accuracy) * cfg.prior_strength
        for _ in range(cfg.iterations):
            agree = dict.fromkeys(raters, 0.0)
            count = dict.fromkeys(raters, 0)
            for vs in items.values():
                prior = sum(v.prior for v in vs) / len(vs)
                z = cfg.rm_prior_weight * _logit(prior) + sum(v.vote * _logit(p[v.rater]) for v in vs)
                q = _sigmoid(z)
                for v in vs:
                    agree[v.rater] += q if v.vote > 0 else 1 - q
                    count[v.rater] += 1
            p = {r: (a + agree[r]) / (a + b + count[r]) for r in raters}
        self.accuracy, self.counts = p, count
        return self._update_quarantine()

    def _update_quarantine(self) -> tuple[set[str], set[str]]:
        cfg = self.cfg
        newly_in, newly_out = set(), set()
        for r, p in self.accuracy.items():
            if r in self.quarantined:
                if p >= cfg.threshold + cfg.hysteresis:
                    newly_out.add(r)
            elif (
                r not in cfg.trusted
                and r not in self.released
                and self.counts.get(r, 0) >= cfg.min_votes
                and p < cfg.threshold
            ):
                newly_in.add(r)
        self.quarantined = (self.quarantined | newly_in) - newly_out
        return newly_in, newly_out

    def forget(self, event_id: str) -> None:
        """Drop a retracted event's vote (its rater changed their mind: one vote, not two)."""
        if any(v.event_id == event_id for v in self.votes):
            self.votes = deque((v for v in self.votes if v.event_id != event_id), maxlen=self.cfg.window)

    def release(self, rater: str) -> bool:
        """An operator's release. It sticks: the rater is not quarantined automatically
        again (an operator's word beats the estimate). True if they were quarantined."""
        self.released.add(rater)
        if rater in self.quarantined:
            self.quarantined.discard(rater)
            return True
        return False

    # ---- weights -------------------------------------------------------------------------

    def weight(self, rater: str) -> float:
        if not self.cfg.enabled:
            return 1.0
        if not rater:
            return self.cfg.anonymous_weight
        if rater in self.quarantined:
            return 0.0
        if rater in self.cfg.trusted:
            return 1.0
        p = self.accuracy.get(rater, self.cfg.prior_accuracy)
        return min(1.0, max(0.0, 2 * p - 1))

    def is_quarantined(self, rater: str) -> bool:
        return self.cfg.enabled and rater in self.quarantined

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "votes": [[v.rater, v.item, v.vote, v.prior, v.event_id] for v in self.votes],
            "accuracy": self.accuracy,
            "counts": self.counts,
            "quarantined": sorted(self.quarantined),
            "released": sorted(self.released),
            "since_refit": self._since_refit,
            "refits": self.refits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.votes = deque(
            (Vote(r, i, int(v), float(p), e) for r, i, v, p, e in state["votes"]), maxlen=self.cfg.window
        )
        self.accuracy = {k: float(v) for k, v in state["accuracy"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.quarantined, self.released = set(state["quarantined"]), set(state["released"])
        self._since_refit, self.refits = int(state["since_refit"]), int(state["refits"])
