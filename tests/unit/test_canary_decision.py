"""The canary decision rule (rlhf/canary/decision.py), by simulation and by exact enumeration.

Simulated canaries (rlhf/testing/canary.py) run through the real `CanaryEvidence` and
`judge`, thousands at once (the batch axis), with the verdict checked after every event as
a service would. Seeds are fixed, so each figure is the same on every run. A bound is
checked as

    empirical rate ≤ α + tolerance,  tolerance = the 99.9 % quantile of Binomial(S, α) / S − α

(computed exactly below): a rule whose true rate is α fails the check with probability
below 0.1 %, and a rule at 2α fails it almost always at these S (≥ 99 %)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from rlhf.canary.config import CanaryConfig
from rlhf.canary.decision import PROMOTE_SIDE, ROLLBACK_SIDE, CanaryEvidence, MixturePrior, Verdict, decide
from rlhf.testing.canary import PROMOTE, ROLL_BACK, simulate_canaries

NO_LIMITS = {"max_events": 0, "max_duration_seconds": 0.0}


def binomial_upper(n: int, p: float, q: float = 0.999) -> float:
    """Smallest rate k/n with P(Binomial(n, p) ≤ k) ≥ q."""
    cdf, k = 0.0, 0
    while True:
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        cdf += math.exp(log_pmf + k * math.log(p) + (n - k) * math.log1p(-p))
        if cdf >= q:
            return k / n
        k += 1


def simulate(sims: int, events: int, *, config: CanaryConfig | None = None, **kw):
    out = simulate_canaries(sims, events, config=config or CanaryConfig(**NO_LIMITS), **kw)
    return out.verdict, out.first, out.naive_promoted


# --- the error bounds, under continuous monitoring -----------------------------------------


def test_equal_versions_thumbs_false_promotion_within_bound_where_a_naive_test_fails():
    config = CanaryConfig(**NO_LIMITS)
    sims = 2000
    verdict, _, naive = simulate(sims, 1000, kind="thumbs", p_candidate=0.5, config=config, seed=1, naive=True)
    promote_bound = binomial_upper(sims, config.promote_alpha)
    assert (verdict == PROMOTE).mean() <= promote_bound
    assert (verdict == ROLL_BACK).mean() <= binomial_upper(sims, config.rollback_alpha)
    # the same streams, a fixed-sample z-test peeked at after every event: far over its 5 %
    assert naive.mean() > 2 * promote_bound


def test_equal_versions_unbalanced_split_false_promotion_within_bound():
    config = CanaryConfig(**NO_LIMITS)
    verdict, _, _ = simulate(1000, 1500, kind="thumbs", p_candidate=0.3, p_stable=0.3, share=0.1, config=config, seed=2)
    assert (verdict == PROMOTE).mean() <= binomial_upper(1000, config.promote_alpha)
    assert (verdict == ROLL_BACK).mean() <= binomial_upper(1000, config.rollback_alpha)


def test_equal_versions_head_to_head_false_promotion_within_bound():
    config = CanaryConfig(**NO_LIMITS)
    verdict, _, _ = simulate(2000, 600, kind="comparisons", p_candidate=0.5, config=config, seed=3)
    assert (verdict == PROMOTE).mean() <= binomial_upper(2000, config.promote_alpha)
    assert (verdict == ROLL_BACK).mean() <= binomial_upper(2000, config.rollback_alpha)


def test_a_rate_that_drifts_while_the_share_grows_does_not_fool_it():
    """Both versions equal at every moment, but the thumbs-up rate climbs 0.3 → 0.7 while the
    candidate's share climbs 0.1 → 0.9: pooled counts make the candidate look better
    (Simpson's paradox), blocks of events that arrived together do not."""
    config = CanaryConfig(**NO_LIMITS)
    n = 1000
    drift, share = np.linspace(0.3, 0.7, n), np.linspace(0.1, 0.9, n)
    out = simulate_canaries(
        1000, n, kind="thumbs", p_candidate=drift, p_stable=drift, share=share, config=config, seed=11, naive=True
    )
    assert out.rate(PROMOTE) <= binomial_upper(1000, config.promote_alpha)
    assert out.rate(ROLL_BACK) <= binomial_upper(1000, config.rollback_alpha)
    assert out.naive_promoted.mean() > 0.5


@pytest.mark.parametrize("p_candidate, p_stable", [(0.3, 0.3), (0.2, 0.6)])
def test_thumbs_e_process_is_exactly_a_supermartingale_under_the_null(p_candidate, p_stable):
    """Every rating outcome of a fixed arm sequence, enumerated: E[e-value] = 1 for equal
    versions (whatever their common rate) and ≤ 1 for a worse candidate — the property
    Ville's inequality needs, with no simulation noise."""
    arms = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=bool)  # candidate?
    outcomes = np.array(list(itertools.product([False, True], repeat=arms.size)))  # (2^n, n) up?
    prob = np.prod(
        np.where(outcomes, np.where(arms, p_candidate, p_stable), np.where(arms, 1 - p_candidate, 1 - p_stable)), axis=1
    )
    for scale in (0.3, 1.5):
        ev = CanaryEvidence(MixturePrior.half_normal(scale, 5), batch=len(outcomes))
        for t in range(arms.size):
            ev.add_thumbs(np.full(len(outcomes), arms[t]), outcomes[:, t])
        mean_e = prob @ np.exp(ev.log_e_thumbs[:, PROMOTE_SIDE])
        if p_candidate == p_stable:
            assert mean_e == pytest.approx(1.0, abs=1e-12)
            assert prob @ np.exp(ev.log_e_thumbs[:, ROLLBACK_SIDE]) == pytest.approx(1.0, abs=1e-12)
        else:
            assert mean_e < 1.0
        assert ev.blocks.max() > 0  # the sequence did close informative blocks


# --- power -----------------------------------------------------------------------------------


def test_thumbs_power_half_vs_six_tenths_within_1500_events():
    """Thumbs-up 0.5 → 0.6, half the feedback on each version: promoted in ≥ 80 % of
    canaries within 1500 events (measured: 80 % by ≈ 1350, docs/canary.md)."""
    verdict, first, _ = simulate(500, 1500, kind="thumbs", p_candidate=0.6, p_stable=0.5, seed=4)
    assert (verdict == PROMOTE).mean() >= 0.8
    assert (verdict == ROLL_BACK).mean() <= 0.01


def test_head_to_head_power_win_rate_six_tenths_within_400_comparisons():
    verdict, _, _ = simulate(500, 400, kind="comparisons", p_candidate=0.6, seed=5)
    assert (verdict == PROMOTE).mean() >= 0.8
    assert (verdict == ROLL_BACK).sum() == 0


def test_worse_candidate_is_rolled_back_and_never_promoted():
    config = CanaryConfig(**NO_LIMITS)
    verdict, _, _ = simulate(300, 1500, kind="thumbs", p_candidate=0.4, p_stable=0.5, config=config, seed=6)
    assert (verdict == ROLL_BACK).mean() >= 0.8
    assert (verdict == PROMOTE).sum() == 0


# --- the limits: minimum sample, alert, timeouts ------------------------------------------


def test_min_sample_holds_back_a_verdict_the_evidence_already_supports():
    config = CanaryConfig(min_events_per_arm=60, **NO_LIMITS)
    ev = CanaryEvidence(MixturePrior.from_config(config))
    rng = np.random.default_rng(7)
    strong_before_min = False
    for _ in range(3000):
        on_candidate = rng.random() < 0.1
        ev.add_thumbs(np.array([on_candidate]), np.array([rng.random() < (0.95 if on_candidate else 0.2)]))
        d = decide(ev, config)
        few = ev.arm_events[0].min() < 60
        if few:
            assert d.verdict is Verdict.CONTINUE and d.reason == "min_sample"
            strong_before_min |= d.evidence["log_e_promote"] >= d.evidence["log_threshold_promote"]
        elif d.verdict is not Verdict.CONTINUE:
            break
    assert strong_before_min, "the evidence should pass its threshold before the minimum sample"
    assert d.verdict is Verdict.PROMOTE and d.evidence["events_candidate"] == 60


def test_alert_fires_before_the_minimum_sample_for_a_much_worse_candidate():
    config = CanaryConfig(min_events_per_arm=500, **NO_LIMITS)
    ev = CanaryEvidence(MixturePrior.from_config(config))
    rng = np.random.default_rng(8)
    for t in range(400):
        on_candidate = t % 2 == 1
        ev.add_thumbs(np.array([on_candidate]), np.array([rng.random() < (0.1 if on_candidate else 0.7)]))
    d = decide(ev, config)
    assert d.verdict is Verdict.CONTINUE and d.reason == "min_sample"
    assert d.alert and d.evidence["alert"]
    assert d.evidence["log_e_thumbs_rollback"] >= d.evidence["log_threshold_alert"]


def test_equal_versions_reaching_max_events_are_rolled_back_at_the_limit():
    config = CanaryConfig(max_events=300, max_duration_seconds=0.0)
    verdict, first, _ = simulate(400, 300, kind="thumbs", p_candidate=0.5, config=config, seed=9)
    undecided_by_evidence = first == 300
    assert (first > 0).all()
    assert (verdict[undecided_by_evidence] == ROLL_BACK).all()
    assert undecided_by_evidence.mean() > 0.8


def test_max_duration_rolls_back_and_says_so():
    config = CanaryConfig(max_duration_seconds=3600.0)
    ev = CanaryEvidence(MixturePrior.from_config(config))
    assert decide(ev, config, elapsed_seconds=3599.0).verdict is Verdict.CONTINUE
    d = decide(ev, config, elapsed_seconds=3600.0)
    assert (d.verdict, d.reason) == (Verdict.ROLL_BACK, "timeout_seconds")
    assert d.evidence["elapsed_seconds"] == 3600.0 and d.evidence["max_duration_seconds"] == 3600.0


def test_thumbs_better_but_comparisons_worse_keeps_stable():
    config = CanaryConfig(**NO_LIMITS)
    ev = CanaryEvidence(MixturePrior.from_config(config))
    rng = np.random.default_rng(10)
    for t in range(400):
        on_candidate = t % 2 == 1
        ev.add_thumbs(np.array([on_candidate]), np.array([rng.random() < (0.9 if on_candidate else 0.3)]))
    assert decide(ev, config).verdict is Verdict.PROMOTE
    for _ in range(150):
        ev.add_comparisons(np.array([rng.random() < 0.1]), np.array([False]))
    d = decide(ev, config)
    assert (d.verdict, d.reason) == (Verdict.ROLL_BACK, "conflict")
    assert d.evidence["log_e_thumbs_promote"] > 0 > d.evidence["log_e_pairs_promote"]


# --- the evidence a verdict carries -----------------------------------------------------------


def test_evidence_is_json_ready_and_matches_the_counts():
    config = CanaryConfig()
    ev = CanaryEvidence(MixturePrior.from_config(config))
    for on_candidate, up in [(0, 1), (1, 1), (1, 0), (0, 0), (1, 1)]:
        ev.add_thumbs(np.array([bool(on_candidate)]), np.array([bool(up)]))
    ev.add_comparisons(np.array([True]), np.array([False]))
    ev.add_comparisons(np.array([False]), np.array([True]))  # a tie
    d = decide(ev, config, elapsed_seconds=12.5)
    e = json.loads(json.dumps(d.evidence, allow_nan=False))
    assert (e["thumbs_up_candidate"], e["thumbs_down_candidate"]) == (2, 1)
    assert (e["thumbs_up_stable"], e["thumbs_down_stable"]) == (1, 1)
    assert (e["wins_candidate"], e["wins_stable"], e["ties"]) == (1, 0, 1)
    assert e["events"] == 7 and (e["events_candidate"], e["events_stable"]) == (4, 3)
    assert e["log_threshold_promote"] == pytest.approx(math.log(20))
    assert e["log_e_promote"] == pytest.approx(e["log_e_thumbs_promote"] + e["log_e_pairs_promote"])
    assert e["verdict"] == "continue" and e["reason"] == "min_sample"


def test_bad_input_names_the_field_and_the_limit():
    ev = CanaryEvidence(MixturePrior.half_normal(0.5, 8), batch=3)
    with pytest.raises(ValueError, match=r"on_candidate: shape \(2,\), expected \(3,\)"):
        ev.add_thumbs(np.zeros(2, dtype=bool), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="prior scale: 0.0 must be > 0"):
        MixturePrior.half_normal(0.0, 8)
    with pytest.raises(ValidationError, match="promote_alpha"):
        CanaryConfig(promote_alpha=1.5)
    with pytest.raises(ValidationError, match="min_events_per_arm"):
        CanaryConfig(min_events_per_arm=0)
