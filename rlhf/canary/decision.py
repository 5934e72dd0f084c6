"""The canary's decision rule: promote, roll back or keep collecting, from users' feedback.

The rule is a one-sided mixture sequential probability ratio test (mSPRT; Robbins 1970,
"Statistical methods related to the law of the iterated logarithm"; as used for A/B tests
by Johari, Pekelis & Walsh, "Always valid inference: continuous monitoring of A/B tests",
arXiv:1512.04922, Operations Research 2022; the e-process view: Howard, Ramdas, McAuliffe &
Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist.).

Both kinds of evidence become Bernoulli observations z whose log-odds are `c + θ`, where c is
known and θ is the effect (θ = 0: the versions are equal; θ > 0: the candidate is better):

- head-to-head (compare mode, candidate vs stable, ties excluded): z = the candidate won,
  c = 0, θ = logit(P(candidate wins)); a one-sample test of the win rate against 0.5;
- thumbs (two-sample: up/down on each version, the rate p both share under the null is
  unknown): the stream is cut into blocks by which version each event rated, never by its
  value — a block is a run of events on one version closed by the first event on the other.
  Given the block's number of ups u among its r + 1 events, where the other version's single
  event sits is all the block says about the difference; its conditional law depends on the
  odds ratio ψ = e^θ = [p_c/(1−p_c)] / [p_s/(1−p_s)] alone (Fisher's noncentral
  hypergeometric, two points here):
      candidate single:  P(candidate up | u)  = σ(θ + log(u / (r+1−u)))
      stable single:     P(stable down | u)   = σ(θ + log((r+1−u) / u))
  so the unknown p drops out exactly (conditioning on a sufficient statistic, as Fisher's
  exact test does), and a drift of p over the day hardly matters: each block compares
  events that arrived together. Blocks with u = 0 or u = r+1 say nothing and are skipped.
  Per block, conditioning costs nothing at θ = 0 (its Fisher information, r/(4(r+1)) for an
  r:1 block at p = 1/2, is the unconditional two-sample one); what it gives up is comparing
  events across blocks. The simulations measure the power that is left (docs/canary.md).

Why the error rate holds under continuous monitoring: for each fixed θ the product of the
likelihood ratios Π ℓ_i(θ)/ℓ_i(0) is a non-negative martingale with mean 1 when the
versions are equal, and a supermartingale when the candidate is worse (each ℓ is logistic
in c + θ, and the convexity of log(1 + e^x) gives E_θ0[ℓ(θ)/ℓ(0)] ≤ 1 for true θ0 ≤ 0 ≤ θ,
given the past); so is its average M_t
over a mixing prior on θ > 0. Ville's inequality gives P(sup_t M_t ≥ 1/α) ≤ α: checked after
every event, any number of times, stopped at any moment, it promotes a candidate that is
not better with probability at most α. A fixed-sample test checked after every event has
no such bound (by the law of the iterated logarithm it crosses any fixed z-threshold with
probability 1 as events accrue); tests/unit/test_canary_decision.py measures both.

The mixing prior is a discrete grid over θ > 0 with half-normal weights (scale τ): the grid
is the prior, so nothing is approximated. Rolling back mirrors it (θ < 0, level
rollback_alpha). The two kinds combine by multiplying their e-processes: each event moves
only one of them, so the product is again a (super)martingale under the joint null, and a
deployment with only one kind pays nothing for the other. The minimum sample and the
duration limits only restrict when a verdict is taken, which keeps every bound.

Assumed: ratings are independent given the version rated, and which version an event rates
does not depend on its value (the gateway's hash split of conversations makes the two arms
alike). Timeout: a canary that reaches max_events or max_duration_seconds undecided is
rolled back — a candidate not shown better does not replace a version proven in service.

State arrays have a leading batch axis (S canaries), so the tests simulate thousands of
canaries with this same code; the controller uses S = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from rlhf.canary.config import CanaryConfig

STABLE, CANDIDATE = 0, 1  # arm index
PROMOTE_SIDE, ROLLBACK_SIDE = 0, 1  # e-process index: evidence the candidate is better / worse
RULE = "mixture SPRT on the log-odds (thumbs: block-conditional odds ratio; comparisons: win rate vs 0.5)"


class Verdict(str, Enum):
    PROMOTE = "promote"
    ROLL_BACK = "roll_back"
    CONTINUE = "continue"


# why a verdict was reached: the reasons, each with its verdict; judge() returns indices into REASONS
VERDICT_OF = {
    "collecting": Verdict.CONTINUE,  # undecided, the minimum sample is in
    "min_sample": Verdict.CONTINUE,  # a version has fewer than min_events_per_arm events
    "better": Verdict.PROMOTE,
    "worse": Verdict.ROLL_BACK,
    "conflict": Verdict.ROLL_BACK,  # both sides passed their thresholds: keep stable
    "timeout_events": Verdict.ROLL_BACK,  # max_events reached undecided
    "timeout_seconds": Verdict.ROLL_BACK,  # max_duration_seconds reached undecided
}
REASONS = tuple(VERDICT_OF)


@dataclass(frozen=True)
class MixturePrior:
    """A discrete prior over the effect size θ > 0 (log-odds scale)."""

    log_odds: np.ndarray  # (G,) θ_g > 0
    log_weights: np.ndarray  # (G,) log π_g, logsumexp(log_weights) == 0

    @classmethod
    def half_normal(cls, scale: float, points: int) -> MixturePrior:
        """Midpoints of `points` equal cells on (0, 4·scale], weights ∝ exp(−θ²/2τ²)."""
        if not scale > 0:
            raise ValueError(f"prior scale: {scale} must be > 0")
        if points < 1:
            raise ValueError(f"prior points: {points} must be ≥ 1")
        theta = (np.arange(points) + 0.5) * (4.0 * scale / points)
        log_w = -0.5 * (theta / scale) ** 2
        return cls(log_odds=theta, log_weights=log_w - _logsumexp(log_w, axis=-1))

    @classmethod
    def from_config(cls, config: CanaryConfig) -> MixturePrior:
        return cls.half_normal(config.prior_scale_log_odds, config.prior_points)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    # terms below e^-700 change nothing; clipping keeps exp away from subnormals, which are slow
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(np.maximum(x - top, -700.0)), axis=axis))


def offset_log_lr(z: np.ndarray, ratio: np.ndarray, log_odds: np.ndarray) -> np.ndarray:
    """log ℓ(θ)/ℓ(0) of Bernoulli z whose odds are `ratio · e^θ`, for every θ in `log_odds`.

    z, ratio: (K,) (ratio = e^c > 0, the odds under θ = 0); log_odds: (..., G) → (K, ..., G).
    log ℓ(θ)/ℓ(0) = z·θ − log(1 + ratio·e^θ) + log(1 + ratio)."""
    shape = (-1,) + (1,) * log_odds.ndim
    z = np.asarray(z, dtype=float).reshape(shape)
    ratio = np.asarray(ratio, dtype=float).reshape(shape)
    return z * log_odds - np.log1p(ratio * np.exp(log_odds)) + np.log1p(ratio)


class CanaryEvidence:
    """Counts and the running e-processes of S canaries (S = 1 in the controller).

    `add_thumbs` / `add_comparisons` take one event for every canary at once (arrays of
    shape (S,)); `log_e_values` is read after any of them."""

    def __init__(self, prior: MixturePrior, batch: int = 1):
        self.prior = prior
        self.batch = batch
        g = prior.log_odds.shape[0]
        self._signed = np.stack([prior.log_odds, -prior.log_odds])  # (2, G): promote side θ>0, rollback θ<0
        # a comparison's ratio is 1 (a fair coin under θ = 0): the log-LR of a loss and of a win
        self._pair_log_lr = offset_log_lr(np.array([0.0, 1.0]), np.ones(2), self._signed)  # (z, side, G)
        self.thumbs_log_lr = np.zeros((batch, 2, g))  # (S, side, G) Σ log ℓ(θ_g)/ℓ(0) over blocks
        self.log_e_thumbs = np.zeros((batch, 2))  # (S, side) log of the mixture over G
        self.log_e_pairs = np.zeros((batch, 2))
        self.ups = np.zeros((batch, 2), dtype=np.int64)  # (S, arm)
        self.downs = np.zeros((batch, 2), dtype=np.int64)
        self.wins = np.zeros((batch, 2), dtype=np.int64)  # (S, arm) decided comparisons won
        self.ties = np.zeros(batch, dtype=np.int64)
        self.blocks = np.zeros(batch, dtype=np.int64)  # informative thumbs blocks used
        self._open_arm = np.full(batch, -1, dtype=np.int8)  # the open block's version, −1: empty
        self._open_n = np.zeros(batch, dtype=np.int64)
        self._open_ups = np.zeros(batch, dtype=np.int64)

    # --- events ---------------------------------------------------------------------------
    def add_thumbs(self, on_candidate: np.ndarray, up: np.ndarray) -> None:
        """One thumbs rating per canary: on_candidate (S,) bool, up (S,) bool."""
        arm = np.asarray(on_candidate, dtype=bool).astype(np.int8)
        up = np.asarray(up, dtype=bool)
        self._check_shape("on_candidate", arm)
        self._check_shape("up", up)
        rows = np.arange(self.batch)
        self.ups[rows, arm] += up
        self.downs[rows, arm] += ~up

        closes = (self._open_arm >= 0) & (self._open_arm != arm)
        r = self._open_n[closes]  # events of the other version in the closing block
        u = self._open_ups[closes] + up[closes]  # ups among the block's r + 1 events
        informative = (u > 0) & (u < r + 1)
        idx = np.flatnonzero(closes)[informative]
        if idx.size:
            r, u = r[informative], u[informative]
            single_is_candidate = arm[idx] == CANDIDATE
            # z: the candidate did better where the single event sits (module docstring)
            z = np.where(single_is_candidate, up[idx], ~up[idx])
            ratio = np.where(single_is_candidate, u / (r + 1 - u), (r + 1 - u) / u)
            self.thumbs_log_lr[idx] += offset_log_lr(z, ratio, self._signed)
            self.log_e_thumbs[idx] = _logsumexp(self.thumbs_log_lr[idx] + self.prior.log_weights, axis=-1)
            self.blocks[idx] += 1

        # a closing event ends its block; any other event joins (or opens) the open block
        self._open_arm = np.where(closes, -1, arm).astype(np.int8)
        self._open_n = np.where(closes, 0, self._open_n + 1)
        self._open_ups = np.where(closes, 0, self._open_ups + up)

    def add_comparisons(self, candidate_won: np.ndarray, tie: np.ndarray) -> None:
        """One candidate-vs-stable comparison per canary: candidate_won (S,), tie (S,) bool."""
        won = np.asarray(candidate_won, dtype=bool)
        tie = np.asarray(tie, dtype=bool)
        self._check_shape("candidate_won", won)
        self._check_shape("tie", tie)
        self.ties += tie
        decided = ~tie
        if not decided.any():
            return
        self.wins[:, CANDIDATE] += won & decided
        self.wins[:, STABLE] += ~won & decided
        # Σ log-LR over the comparisons depends on the counts alone, (U, z) @ (z, side·G) with
        # z = candidate won, so it is computed once per distinct (losses, wins) among the S rows
        base = int(self.wins[:, STABLE].max()) + 1
        keys, row_of = np.unique(self.wins[:, CANDIDATE] * base + self.wins[:, STABLE], return_inverse=True)
        counts = np.stack([keys % base, keys // base], axis=1).astype(float)  # (U, z): stable wins, candidate wins
        log_lr = (counts @ self._pair_log_lr.reshape(2, -1)).reshape(len(counts), 2, -1)
        self.log_e_pairs = _logsumexp(log_lr + self.prior.log_weights, axis=-1)[row_of.reshape(-1)]

    def _check_shape(self, name: str, a: np.ndarray) -> None:
        if a.shape != (self.batch,):
            raise ValueError(f"{name}: shape {a.shape}, expected ({self.batch},), one event per canary")

    # --- reads ----------------------------------------------------------------------------
    @property
    def log_e_values(self) -> np.ndarray:
        """(S, side) log e-value of the two kinds together (their product)."""
        return self.log_e_thumbs + self.log_e_pairs

    @property
    def arm_events(self) -> np.ndarray:
        """(S, arm) feedback events per version: its thumbs and the decided comparisons."""
        return self.ups + self.downs + self.wins.sum(axis=1, keepdims=True)

    @property
    def events(self) -> np.ndarray:
        """(S,) feedback events of the canary, ties included."""
        return (self.ups + self.downs).sum(axis=1) + self.wins.sum(axis=1) + self.ties


def judge(
    evidence: CanaryEvidence, config: CanaryConfig, elapsed_seconds: float | np.ndarray = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised rule: (reason index into REASONS (S,), alert (S,) bool) for S canaries."""
    log_e = evidence.log_e_values
    better = log_e[:, PROMOTE_SIDE] >= -math.log(config.promote_alpha)
    worse = log_e[:, ROLLBACK_SIDE] >= -math.log(config.rollback_alpha)
    alert = evidence.log_e_thumbs[:, ROLLBACK_SIDE] >= -math.log(config.alert_alpha)
    enough = evidence.arm_events.min(axis=1) >= config.min_events_per_arm
    out_of_events = (evidence.events >= config.max_events) if config.max_events else np.zeros(evidence.batch, bool)
    elapsed = np.broadcast_to(np.asarray(elapsed_seconds, dtype=float), (evidence.batch,))
    out_of_time = (elapsed >= config.max_duration_seconds) if config.max_duration_seconds else np.zeros_like(enough)
    # first match wins: the evidence, then the limits, then why it keeps collecting
    reason = np.select(
        [enough & worse & better, enough & worse, enough & better, out_of_events, out_of_time, ~enough],
        [REASONS.index(r) for r in ("conflict", "worse", "better", "timeout_events", "timeout_seconds", "min_sample")],
        default=REASONS.index("collecting"),
    )
    return reason, alert


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str  # better, worse, conflict, timeout_events, timeout_seconds, min_sample, collecting
    alert: bool  # the thumbs-down alert: the candidate is rated significantly worse
    evidence: dict[str, Any]  # JSON-ready: counts, log e-values, thresholds (for a PolicyUpdate / log line)


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 6) if n else None


def decide(evidence: CanaryEvidence, config: CanaryConfig, elapsed_seconds: float = 0.0, row: int = 0) -> Decision:
    """The verdict for canary `row`, with everything it rests on."""
    reason_idx, alert = judge(evidence, config, elapsed_seconds)
    reason = REASONS[int(reason_idx[row])]
    ups, downs, wins = evidence.ups[row], evidence.downs[row], evidence.wins[row]
    log_e, log_e_t, log_e_p = evidence.log_e_values[row], evidence.log_e_thumbs[row], evidence.log_e_pairs[row]
    arm_events = evidence.arm_events[row]
    info: dict[str, Any] = {
        "rule": RULE,
        "verdict": VERDICT_OF[reason].value,
        "reason": reason,
        "alert": bool(alert[row]),
        "thumbs_up_stable": int(ups[STABLE]),
        "thumbs_down_stable": int(downs[STABLE]),
        "thumbs_up_candidate": int(ups[CANDIDATE]),
        "thumbs_down_candidate": int(downs[CANDIDATE]),
        "thumbs_up_rate_stable": _rate(int(ups[STABLE]), int(ups[STABLE] + downs[STABLE])),
        "thumbs_up_rate_candidate": _rate(int(ups[CANDIDATE]), int(ups[CANDIDATE] + downs[CANDIDATE])),
        "thumbs_blocks": int(evidence.blocks[row]),
        "wins_candidate": int(wins[CANDIDATE]),
        "wins_stable": int(wins[STABLE]),
        "ties": int(evidence.ties[row]),
        "win_rate_candidate": _rate(int(wins[CANDIDATE]), int(wins.sum())),
        "events": int(evidence.events[row]),
        "events_stable": int(arm_events[STABLE]),
        "events_candidate": int(arm_events[CANDIDATE]),
        "elapsed_seconds": round(float(elapsed_seconds), 3),
        # the statistic: natural-log e-values; a side decides when it reaches log(1/alpha)
        "log_e_promote": round(float(log_e[PROMOTE_SIDE]), 6),
        "log_e_rollback": round(float(log_e[ROLLBACK_SIDE]), 6),
        "log_e_thumbs_promote": round(float(log_e_t[PROMOTE_SIDE]), 6),
        "log_e_thumbs_rollback": round(float(log_e_t[ROLLBACK_SIDE]), 6),
        "log_e_pairs_promote": round(float(log_e_p[PROMOTE_SIDE]), 6),
        "log_e_pairs_rollback": round(float(log_e_p[ROLLBACK_SIDE]), 6),
        "log_threshold_promote": round(-math.log(config.promote_alpha), 6),
        "log_threshold_rollback": round(-math.log(config.rollback_alpha), 6),
        "log_threshold_alert": round(-math.log(config.alert_alpha), 6),
        "promote_alpha": config.promote_alpha,
        "rollback_alpha": config.rollback_alpha,
        "alert_alpha": config.alert_alpha,
        "min_events_per_arm": config.min_events_per_arm,
        "max_events": config.max_events,
        "max_duration_seconds": config.max_duration_seconds,
        "prior_scale_log_odds": config.prior_scale_log_odds,
    }
    return Decision(verdict=VERDICT_OF[reason], reason=reason, alert=bool(alert[row]), evidence=info)
