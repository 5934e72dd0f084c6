"""Which two of k sampled answers a comparison shows (settings compare_candidates, compare_selection),
and which one of k a one-answer chat shows (serve_best_of: the reward model's top one).

A pair both answers of which please (or displease) the person equally is a tie: it costs a
chat and yields no comparison. Sampling k > 2 answers and showing the most informative
two is active preference elicitation:

  first         the first two samples (what k = 2 always does)
  rm_uncertain  the pair whose Bradley-Terry win probability σ(r_a − r_b) under the live
                reward model is closest to 1/2, i.e. the smallest |r_a − r_b|: the choice
                the RM is least sure about (uncertainty sampling; Mehta et al. 2023,
                "Sample Efficient Reinforcement Learning from Human Feedback via Active
                Exploration"; Dwaracherla et al. 2024, "Efficient Exploration for LLMs")
  rm_extremes   the live reward model's best and worst of the k (the largest |r_a − r_b|):
                the pair online iterative DPO trains on (Xiong et al. 2024, "Iterative
                Preference Learning from Human Feedback"; Dong et al. 2024, "RLHF Workflow:
                From Reward Modeling to Online RLHF"). For a preference the model rarely
                satisfies, the one candidate that shows the behaviour (when the RM already
                scores it up) is shown against one that does not, instead of two that both
                lack it — a tie — as uncertainty sampling tends to pick once the RM is sure
  diverse       the pair with the largest Jaccard distance between their sets of character
                3-grams (shingles; Broder 1997, "On the resemblance and containment of
                documents"): two answers that differ most are least likely to please a
                person equally. Shingles rather than words, so answers that share no
                whole word (misspellings, a small model's fragments) still differ by degree

Ties between pairs go to the earliest pair (lowest indices), so a selection is a pure
function of the k texts (and their scores): a test can recompute it.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Literal, Sequence

import grpc

from rlhf.v1 import common_pb2, reward_pb2
from services.gateway.metrics import COMPARE_FALLBACKS

log = logging.getLogger("gateway")

Selection = Literal["first", "rm_uncertain", "rm_extremes", "diverse"]
SELECTIONS: tuple[str, ...] = ("first", "rm_uncertain", "rm_extremes", "diverse")

SHINGLE = 3  # characters per shingle


def shingles(text: str, k: int = SHINGLE) -> frozenset[str]:
    """The set of k-character substrings of `text`, lower-cased, runs of whitespace as one
    space; a text shorter than k is its own one shingle."""
    t = " ".join(text.lower().split())
    if not t:
        return frozenset()
    return frozenset(t[i : i + k] for i in range(max(1, len(t) - k + 1)))


def jaccard_distance(a: str, b: str) -> float:
    """1 − |A ∩ B| / |A ∪ B| over shingle sets; two empty answers are identical (0)."""
    ta, tb = shingles(a), shingles(b)
    union = ta | tb
    return 0.0 if not union else 1.0 - len(ta & tb) / len(union)


def most_diverse_pair(texts: Sequence[str]) -> tuple[int, int]:
    """(i, j), i < j: the pair of `texts` with the largest Jaccard distance (earliest on ties)."""
    _need_two(texts)
    best, best_d = (0, 1), -1.0
    for i, j in itertools.combinations(range(len(texts)), 2):
        d = jaccard_distance(texts[i], texts[j])
        if d > best_d:
            best, best_d = (i, j), d
    return best


def most_uncertain_pair(scores: Sequence[float]) -> tuple[int, int]:
    """(i, j), i < j: the pair with the smallest |r_i − r_j|, i.e. σ(r_i − r_j) nearest 1/2
    (σ is monotone, so no sigmoid is needed to rank); earliest on ties."""
    _need_two(scores)
    best, best_gap = (0, 1), float("inf")
    for i, j in itertools.combinations(range(len(scores)), 2):
        gap = abs(scores[i] - scores[j])
        if gap < best_gap:
            best, best_gap = (i, j), gap
    return best


def extreme_pair(scores: Sequence[float]) -> tuple[int, int]:
    """(i, j), i < j: the highest- and the lowest-scored candidates (the largest |r_i − r_j|);
    the earliest index of each on ties. All equal: the first two."""
    _need_two(scores)
    hi = max(range(len(scores)), key=lambda i: (scores[i], -i))
    lo = min(range(len(scores)), key=lambda i: (scores[i], i))
    if hi == lo:
        return (0, 1)
    return (min(hi, lo), max(hi, lo))


def _need_two(xs: Sequence) -> None:
    if len(xs) < 2:
        raise ValueError(f"a pair needs at least 2 candidates, got {len(xs)}")


async def pick_pair(
    selection: Selection, prompt: list[dict[str, str]], texts: Sequence[str], reward, timeout: float
) -> tuple[tuple[int, int], str]:
    """The pair to show and the selection that applied ("first" when an RM selection fell back).

    `reward` is a RewardService stub. The reward service being down, slow or wrong is never
    the caller's error: the comparison shows the first two, with an ERROR line and
    rlhf_gateway_compare_fallbacks_total{reason} counting why."""
    if selection == "diverse":
        return most_diverse_pair(texts), "diverse"
    if selection == "first":
        return (0, 1), "first"
    raw = await _scores(prompt, texts, reward, timeout, f"{selection} comparison fell back to the first two answers")
    if raw is None:
        return (0, 1), "first"
    return (extreme_pair(raw) if selection == "rm_extremes" else most_uncertain_pair(raw)), selection


async def pick_best(prompt: list[dict[str, str]], texts: Sequence[str], reward, timeout: float) -> tuple[int, str]:
    """(index of the answer to serve, "rm_best" or "first" when the RM could not score them):
    the highest raw RM score, earliest on ties. As for comparisons, a reward service that is
    down or wrong serves the first answer, with an ERROR line and a fallback count."""
    raw = await _scores(prompt, texts, reward, timeout, "best-of-n fell back to the first answer")
    return (0, "first") if raw is None else (max(range(len(raw)), key=lambda i: (raw[i], -i)), "rm_best")


async def _scores(
    prompt: list[dict[str, str]], texts: Sequence[str], reward, timeout: float, fallback_line: str
) -> list[float] | None:
    """The RM's raw scores of `texts`, or None (counted and logged) when it could not give them."""
    chat = [common_pb2.ChatMessage(**m) for m in prompt]
    req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=chat, response=t) for t in texts])
    try:
        resp = await reward.Score(req, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        return _fallback(
            code.name.lower(),
            f"Score failed: {code.name}: {e.details() if hasattr(e, 'details') else e}",
            fallback_line,
        )
    raw = list(resp.raw_scores) or list(resp.scores)
    if len(raw) != len(texts) or not all(math.isfinite(r) for r in raw):
        return _fallback(
            "bad_scores",
            f"Score returned {len(raw)} scores for {len(texts)} answers (or a non-finite one)",
            fallback_line,
        )
    return raw


def _fallback(reason: str, detail: str, line: str) -> None:
    COMPARE_FALLBACKS.labels(reason).inc()
    log.error(line, extra={"reason": reason, "detail": detail})
