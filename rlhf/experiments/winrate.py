"""Win-rate and KL summaries: the pure arithmetic of `rlhf eval` and the kl-sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Share of paired comparisons our answer wins, ties counting half (AlpacaEval's rule).
    ours[i] and theirs[i] are the oracle's scores of two answers to the same prompt; when
    the lengths differ, every answer of ours meets every answer of theirs in turn (i mod n)."""
    if not ours or not theirs:
        raise ValueError("win_rate needs at least one score on each side")
    n = max(len(ours), len(theirs))
    wins = 0.0
    for i in range(n):
        a, b = ours[i % len(ours)], theirs[i % len(theirs)]
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / n


def win_rate_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a win-rate over n comparisons (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def sequence_kl(logprobs: Sequence[float], ref_logprobs: Sequence[float]) -> float:
    """k1 estimate of KL(π‖π_ref) for one sampled answer: Σ_t log π(y_t) − log π_ref(y_t)
    (unbiased over answers sampled from π at temperature 1; can be negative for one)."""
    if len(logprobs) != len(ref_logprobs):
        raise ValueError(f"{len(logprobs)} log-probs but {len(ref_logprobs)} reference log-probs")
    return float(sum(a - b for a, b in zip(logprobs, ref_logprobs)))


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
