"""Controlled pairs: does a reward model see the preference, or a correlate of it (length)?

Online accuracy on users' comparisons cannot tell "the RM learned the property" from "the
RM learned something that came with it": when the preferred answers were also longer, a
length detector scores as well. Pairs that differ in ONE property can:

  property pairs (a)  the same answer with and without the preferred property, at the same
                      word count — accuracy = share where the RM scores the one with the
                      property higher (0.5 = blind to it)
  length pairs (b)    the same answer at two lengths, the property the same on both sides —
                      longer_wins = share where the longer one scores higher (0.5 = length-
                      neutral), score_per_10_words = mean (r_long − r_short) / Δwords · 10

Builders, per oracle of rlhf/experiments/oracles.py (by function name):
  prefers_question_ending  (a) the last sentence's end mark "?" vs "." (same words);
                           (b) the answer with/without a neutral filler sentence before the
                               last one (the ending, and so the property, untouched)
  prefers_keyword          (a) one word replaced by the keyword vs the same answer without
                               it (every keyword first replaced by a neutral word);
                           (b) as above, fillers never contain the keyword
  prefers_exclamation      (a) the last sentence's end mark "!" vs "." (every other "!" made
                               "."); (b) as above, fillers have no "!"
  others (concise, ...)    (b) only: for a length preference, length IS the property

Every builder checks its own pair: the two sides have equal word counts (a) / the same
property value (b); an answer a builder cannot use (empty, one word) is skipped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from rlhf.experiments.oracles import PROPERTY, ends_with_question, has_keyword  # noqa: F401 - re-exported

_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
KEYWORD = "please"  # the keyword of rlhf.experiments.oracles.prefers_keyword
NEUTRAL_WORD = "now"  # what a keyword is replaced by when building the "without" side
# property-free filler for length pairs: no keyword, no question mark, ordinary content
FILLERS = (
    "This is a common point of confusion.",
    "Many people find this part useful to know.",
    "The details depend a little on the situation.",
    "It helps to keep the main idea in mind.",
    "There are several ways to look at this.",
    "In practice the simple approach works well.",
    "Each step builds on the one before it.",
    "That is the short version of the story.",
)


def count_words(text: str) -> int:
    """Words as the oracles count them (rlhf.experiments.oracles.words)."""
    return len(_WORD.findall(text.lower()))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


@dataclass(frozen=True)
class ProbePair:
    prompt: str
    better: str  # (a): the side with the property; (b): the longer side
    worse: str  # (a): without it;                 (b): the shorter side
    kind: str  # "property" or "length"


def _with_end_mark(text: str, mark: str) -> str:
    body = text.rstrip().rstrip("\"')»”").rstrip(".!?;:,")
    return body + mark


def question_pair(prompt: str, answer: str) -> ProbePair | None:
    """(a) for prefers_question_ending: same words, the answer ending in "?" vs in "."."""
    if count_words(answer) < 2:
        return None
    return ProbePair(prompt, _with_end_mark(answer, "?"), _with_end_mark(answer, "."), "property")


def exclamation_pair(prompt: str, answer: str) -> ProbePair | None:
    """(a) for prefers_exclamation: same words, every "!" made "." and the last sentence
    ending in "!" vs in "."."""
    base = answer.replace("!", ".")
    if count_words(base) < 2:
        return None
    return ProbePair(prompt, _with_end_mark(base, "!"), _with_end_mark(base, "."), "property")


def keyword_pair(prompt: str, answer: str, rng: random.Random, keyword: str = KEYWORD) -> ProbePair | None:
    """(a) for prefers_keyword: one word swapped for the keyword vs the answer without it."""
    base = re.sub(rf"\b{re.escape(keyword)}\b", NEUTRAL_WORD, answer, flags=re.IGNORECASE)
    spans = [m.span() for m in _WORD.finditer(base)]
    if len(spans) < 2:
        return None
    start, end = spans[rng.randrange(1, len(spans))]  # not the first word: keep the opening
    return ProbePair(prompt, base[:start] + keyword + base[end:], base, "property")


def length_pair(
    prompt: str, answer: str, rng: random.Random, keep: Callable[[str], object], min_extra_words: int = 10
) -> ProbePair | None:
    """(b): the answer vs the same answer with filler sentences inserted before its last
    sentence (at least `min_extra_words` more words); `keep(text)` is the property that
    must be equal on both sides, else the pair is skipped."""
    parts = sentences(answer)
    if not parts or count_words(answer) < 2:
        return None
    filler: list[str] = []
    while sum(count_words(f) for f in filler) < min_extra_words:
        filler.append(rng.choice(FILLERS))
    longer = " ".join(parts[:-1] + filler + parts[-1:])
    if keep(longer) != keep(answer):
        return None
    return ProbePair(prompt, longer, answer, "length")


def _no_property(text: str) -> int:
    return 0


def build_probes(
    oracle_name: str, prompts: Sequence[str], answers: Sequence[str], seed: int = 0
) -> tuple[list[ProbePair], list[ProbePair]]:
    """(property pairs, length pairs) from answers to prompts, for the oracle named
    `oracle_name` (a function name of rlhf.experiments.oracles); no property pairs for an oracle
    without a builder. Same seed, same pairs."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rng = random.Random(seed)
    prop: list[ProbePair] = []
    length: list[ProbePair] = []
    keep = PROPERTY.get(oracle_name, _no_property)
    for p, a in zip(prompts, answers):
        if oracle_name == "prefers_question_ending":
            pair = question_pair(p, a)
        elif oracle_name == "prefers_keyword":
            pair = keyword_pair(p, a, rng)
        elif oracle_name == "prefers_exclamation":
            pair = exclamation_pair(p, a)
        else:
            pair = None
        if pair is not None:
            prop.append(pair)
        lp = length_pair(p, a, rng, keep)
        if lp is not None:
            length.append(lp)
    return prop, length


ScoreFn = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, responses) -> scores


def probe_report(score: ScoreFn, prop: Sequence[ProbePair], length: Sequence[ProbePair]) -> dict[str, float | int]:
    """Score both sides of every pair (one call per side) and summarise:
    rm_probe_property_accuracy   share of property pairs with r(better) > r(worse)   (nan: none)
    rm_probe_longer_wins         share of length pairs with r(longer) > r(shorter)
    rm_probe_score_per_10_words  mean (r_long − r_short) / Δwords · 10, in the score's units
    rm_probe_property_pairs, rm_probe_length_pairs: how many pairs each figure rests on."""
    pairs = list(prop) + list(length)
    prompts = [q.prompt for q in pairs]
    hi = list(score(prompts, [q.better for q in pairs])) if pairs else []
    lo = list(score(prompts, [q.worse for q in pairs])) if pairs else []
    n = len(prop)
    nan = float("nan")
    prop_right = [h > w for h, w in zip(hi[:n], lo[:n])]
    wins = [h > w for h, w in zip(hi[n:], lo[n:])]
    slopes = [(h - w) / (count_words(q.better) - count_words(q.worse)) * 10 for q, h, w in zip(length, hi[n:], lo[n:])]
    return {
        "rm_probe_property_accuracy": sum(prop_right) / n if n else nan,
        "rm_probe_property_pairs": n,
        "rm_probe_longer_wins": sum(wins) / len(wins) if wins else nan,
        "rm_probe_score_per_10_words": sum(slopes) / len(slopes) if slopes else nan,
        "rm_probe_length_pairs": len(length),
    }
