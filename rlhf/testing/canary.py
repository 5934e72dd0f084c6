"""Simulated canaries for the decision rule's tests and benchmark: thousands at once through
the real `CanaryEvidence` and `judge` (rlhf/canary/decision.py), the verdict checked after
every event as the controller does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhf.canary.config import CanaryConfig
from rlhf.canary.decision import CANDIDATE, REASONS, STABLE, VERDICT_OF, CanaryEvidence, MixturePrior, Verdict, judge

CONTINUE, PROMOTE, ROLL_BACK = 0, 1, 2  # verdict codes of `Simulated.verdict`
_CODE = np.array([{Verdict.CONTINUE: 0, Verdict.PROMOTE: 1, Verdict.ROLL_BACK: 2}[VERDICT_OF[r]] for r in REASONS])
Z_95 = 1.6448536269514722  # Φ^-1(0.95): the naive test's one-sided 5 % threshold


@dataclass
class Simulated:
    verdict: np.ndarray  # (S,) CONTINUE / PROMOTE / ROLL_BACK: the first verdict, CONTINUE if none
    first: np.ndarray  # (S,) the event (1-based) of the first verdict, −1 if none
    naive_promoted: np.ndarray  # (S,) bool: a fixed-sample z-test, checked after every event, ever promoted

    def rate(self, code: int) -> float:
        return float((self.verdict == code).mean())

    def events_for(self, code: int, q: float) -> float:
        """Events by which a share q of the canaries reached verdict `code` (inf if fewer did)."""
        times = np.sort(np.where(self.verdict == code, self.first, np.iinfo(np.int64).max))
        k = max(int(np.ceil(q * len(times))) - 1, 0)  # the nearest rank
        return float(times[k]) if times[k] < np.iinfo(np.int64).max else float("inf")


def simulate_canaries(
    sims: int,
    events: int,
    *,
    kind: str,
    p_candidate: float | np.ndarray,
    p_stable: float | np.ndarray = 0.5,
    share: float | np.ndarray = 0.5,
    config: CanaryConfig | None = None,
    seed: int = 0,
    naive: bool = False,
) -> Simulated:
    """`sims` canaries of `events` feedback events each. kind="thumbs": an event rates the
    candidate with probability `share`, thumbs-up with p_candidate (p_stable on stable);
    kind="comparisons": the candidate wins with p_candidate. Each of the three may also be an
    array of one value per event (a rate or a split that drifts during the canary). naive=True also runs a
    fixed-sample one-sided two-proportion z-test at 5 % on the same thumbs, checked after every
    event once each arm has config.min_events_per_arm (what continuous monitoring must not use)."""
    if kind not in ("thumbs", "comparisons"):
        raise ValueError(f"kind: {kind!r} is neither 'thumbs' nor 'comparisons'")
    config = config or CanaryConfig()
    rng = np.random.default_rng(seed)
    ev = CanaryEvidence(MixturePrior.from_config(config), sims)
    verdict = np.zeros(sims, dtype=np.int64)
    first = np.full(sims, -1)
    naive_promoted = np.zeros(sims, dtype=bool)
    no_tie = np.zeros(sims, dtype=bool)
    p_c, p_s, share = (np.broadcast_to(np.asarray(x, dtype=float), (events,)) for x in (p_candidate, p_stable, share))
    for t in range(1, events + 1):
        if kind == "thumbs":
            on_candidate = rng.random(sims) < share[t - 1]
            ev.add_thumbs(on_candidate, rng.random(sims) < np.where(on_candidate, p_c[t - 1], p_s[t - 1]))
        else:
            ev.add_comparisons(rng.random(sims) < p_c[t - 1], no_tie)
        reason, _ = judge(ev, config)
        code = _CODE[reason]
        new = (first < 0) & (code != CONTINUE)
        verdict[new], first[new] = code[new], t
        if naive:
            n = ev.ups + ev.downs  # (S, arm)
            rate = ev.ups / np.maximum(n, 1)
            pooled = ev.ups.sum(1) / np.maximum(n.sum(1), 1)
            se = np.sqrt(pooled * (1 - pooled) * (1 / np.maximum(n[:, STABLE], 1) + 1 / np.maximum(n[:, CANDIDATE], 1)))
            z = (rate[:, CANDIDATE] - rate[:, STABLE]) / np.where(se > 0, se, np.inf)
            naive_promoted |= (n.min(1) >= config.min_events_per_arm) & (z >= Z_95)
    return Simulated(verdict, first, naive_promoted)
