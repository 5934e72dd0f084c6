"""From feedback events to training examples: de-duplication, thumbs pairing, replay buffer.

How ratings become training signal (the choice the issue asks to document):
  * a comparison is one Bradley-Terry pair (chosen ≻ rejected);
  * a tie ("as good as each other") is one tie pair: Bradley-Terry with target ½, i.e.
    −½ log σ(r_a − r_b) − ½ log σ(r_b − r_a), which pulls the two scores together;
  * "both bad" is no pair (neither is preferred, so it says nothing about their order):
    each answer trains a pointwise thumbs-down term, as two −1 ratings would;
  * a thumbs rating that finds an *opposite* rating of a *different* answer to the same
    prompt (same conversation messages) among the recent ratings becomes a Bradley-Terry
    pair (up ≻ down), the cleanest signal a rating can give;
  * any other rating (the first one for its prompt, or one that agrees with the earlier
    ones) trains a pointwise logistic term −log σ(±r): thumbs are absolute judgements,
    and waiting for a partner that may never come would drop most of them.
A rating that first trained pointwise and later completes a pair therefore counts in
both forms, each once: feedback is consumed once, in arrival order, never re-labelled.

An event that decodes but means nothing — no rating or comparison, a rating other than
±1, no prompt, an empty answer, two identical answers, text over the RM's limits — is
refused with an `Invalid` (reason class and detail); the reward service dead-letters it
to rlhf.feedback.dlq with the detail and counts it by class.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rlhf.v1 import events_pb2
from rlhf.validation import Invalid

PAIR = "pair"
POINT = "point"
TIE = "tie"  # a pair judged equally good: chosen/rejected are just the two answers
RATING_VALUES = (1, -1)  # thumbs up, thumbs down: what the gateway accepts

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclass(frozen=True)
class Example:
    """One unit of reward-model training signal.

    kind == "pair":  chosen ≻ rejected for prompt
    kind == "tie":   chosen ≈ rejected for prompt (the two answers, in the order shown)
    kind == "point": response rated label (+1 up, −1 down) for prompt
    rater: who gave the event (Feedback.rater_id; "" anonymous): its reliability weighs it
    """

    kind: str
    prompt: Messages
    chosen: str = ""
    rejected: str = ""
    response: str = ""
    label: int = 0
    event_id: str = ""
    rater: str = ""

    def texts(self) -> list[str]:
        return [self.chosen, self.rejected] if self.kind in (PAIR, TIE) else [self.response]

    def to_json(self) -> list[Any]:
        return [
            self.kind,
            [list(m) for m in self.prompt],
            self.chosen,
            self.rejected,
            self.response,
            self.label,
            self.event_id,
            self.rater,
        ]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> "Example":
        kind, prompt, chosen, rejected, response, label, event_id, *rest = row  # no rater: an older checkpoint
        rater = rest[0] if rest else ""
        return cls(kind, tuple((r, c) for r, c in prompt), chosen, rejected, response, int(label), event_id, rater)


@dataclass(frozen=True)
class FeedbackLimits:
    """The most text one feedback event may carry: the reward service's Score limits, so
    the RM never trains on text it would refuse to score."""

    max_prompt_chars: int  # all messages' content (RLHF_REWARD_MAX_PROMPT_CHARS)
    max_response_chars: int  # each rated or compared answer (RLHF_REWARD_MAX_RESPONSE_CHARS)


def messages_of(chat: Iterable[Any]) -> Messages:
    """ChatMessage protos (or dicts) as a hashable tuple of (role, content)."""
    out = []
    for m in chat:
        if isinstance(m, dict):
            out.append((str(m["role"]), str(m["content"])))
        else:
            out.append((m.role, m.content))
    return tuple(out)


def prompt_key(prompt: Messages) -> str:
    return hashlib.sha1(json.dumps(prompt).encode()).hexdigest()


class EventDedup:
    """The last `capacity` event ids, oldest forgotten first; persisted in checkpoints."""

    def __init__(self, capacity: int = 200_000, ids: Iterable[str] = ()):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for i in ids:
            self.add(i)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> bool:
        """True if the id is new (and now remembered), False for a duplicate."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def state(self) -> list[str]:
        return list(self._ids)


def feedback_problem(fb: Any, limits: FeedbackLimits | None = None) -> Invalid | None:
    """Why one events_pb2.Feedback cannot train the RM, or None if it can (text lengths
    are checked only against `limits`). The reasons, the label of rlhf_feedback_invalid_total:
    no_rating_or_comparison, empty_prompt, empty_response, too_long, identical_responses,
    rating_out_of_range."""
    which = fb.WhichOneof("kind")
    if which not in ("comparison", "rating"):
        return Invalid("no_rating_or_comparison", "kind: the event holds neither a rating nor a comparison")
    if not fb.prompt:
        return Invalid("empty_prompt", "prompt: no messages; feedback rates an answer to a prompt")
    prompt_chars = sum(len(m.content) for m in fb.prompt)
    if limits is not None and prompt_chars > limits.max_prompt_chars:
        return Invalid(
            "too_long",
            f"prompt: {prompt_chars} characters > limit {limits.max_prompt_chars} (RLHF_REWARD_MAX_PROMPT_CHARS)",
        )
    answers = (
        (("comparison.chosen", fb.comparison.chosen), ("comparison.rejected", fb.comparison.rejected))
        if which == "comparison"
        else (("rating.response", fb.rating.response),)
    )
    for field, text in answers:
        if not text:
            return Invalid("empty_response", f"{field} is empty")
        if limits is not None and len(text) > limits.max_response_chars:
            return Invalid(
                "too_long",
                f"{field}: {len(text)} characters > limit {limits.max_response_chars} (RLHF_REWARD_MAX_RESPONSE_CHARS)",
            )
    if which == "comparison" and fb.comparison.chosen == fb.comparison.rejected:
        return Invalid("identical_responses", "comparison: chosen and rejected are the same text")
    if which == "rating" and fb.rating.value not in RATING_VALUES:
        return Invalid("rating_out_of_range", f"rating.value: {fb.rating.value}, must be +1 (up) or -1 (down)")
    return None


class FeedbackConverter:
    """Feedback events → Examples, remembering the last ratings of recent prompts to pair them."""

    def __init__(self, max_prompts: int = 10_000, per_prompt: int = 4, limits: FeedbackLimits | None = None):
        self.max_prompts = max_prompts
        self.per_prompt = per_prompt
        self.limits = limits
        # prompt key → [(response, value)], most recent last; LRU over prompts
        self._ratings: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()

    def convert(self, fb: Any) -> tuple[str, list[Example], Invalid | None]:
        """(kind, examples, problem) for one events_pb2.Feedback. kind is "comparison",
        "thumbs" or "unknown"; problem is None, or why the event carries no training signal
        (then there are no examples)."""
        which = fb.WhichOneof("kind")
        kind = {"comparison": "comparison", "rating": "thumbs"}.get(which, "unknown")
        problem = feedback_problem(fb, self.limits)
        if problem is not None:
            return kind, [], problem
        prompt = messages_of(fb.prompt)
        ids = dict(event_id=fb.event_id, rater=fb.rater_id)
        if which == "comparison":
            c = fb.comparison
            outcome = c.outcome
            if outcome == events_pb2.COMPARISON_OUTCOME_TIE:
                return "tie", [Example(TIE, prompt, chosen=c.chosen, rejected=c.rejected, **ids)], None
            if outcome == events_pb2.COMPARISON_OUTCOME_BOTH_BAD:
                both = [Example(POINT, prompt, response=t, label=-1, **ids) for t in (c.chosen, c.rejected)]
                return "both_bad", both, None
            return kind, [Example(PAIR, prompt, chosen=c.chosen, rejected=c.rejected, **ids)], None
        r = fb.rating
        return kind, [self._rate(prompt, r.response, r.value, fb.event_id, fb.rater_id)], None

    def forget(self, prompt: Messages, response: str) -> None:
        """Drop a retracted rating from the pairing memory, so that no later rating pairs with it."""
        key = prompt_key(prompt)
        if key in self._ratings:
            self._ratings[key] = [(resp, v) for resp, v in self._ratings[key] if resp != response]

    def _rate(self, prompt: Messages, response: str, value: int, event_id: str, rater: str = "") -> Example:
        key = prompt_key(prompt)
        seen = self._ratings.pop(key, [])
        partner = next((resp for resp, v in reversed(seen) if v == -value and resp != response), None)
        seen = (seen + [(response, value)])[-self.per_prompt :]
        self._ratings[key] = seen
        while len(self._ratings) > self.max_prompts:
            self._ratings.popitem(last=False)
        if partner is None:
            return Example(POINT, prompt, response=response, label=value, event_id=event_id, rater=rater)
        chosen, rejected = (response, partner) if value > 0 else (partner, response)
        return Example(PAIR, prompt, chosen=chosen, rejected=rejected, event_id=event_id, rater=rater)

    def state(self) -> list[list[Any]]:
        return [[k, [list(x) for x in v]] for k, v in self._ratings.items()]

    def load_state(self, state: list[list[Any]]) -> None:
        self._ratings = OrderedDict((k, [(resp, int(v)) for resp, v in vals]) for k, vals in state)


class ReplayBuffer:
    """The last `capacity` examples; training batches mix new examples with a uniform sample of these."""

    def __init__(self, capacity: int = 20_000, seed: int = 0):
        self._items: deque[Example] = deque(maxlen=capacity)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, examples: Iterable[Example]) -> None:
        self._items.extend(examples)

    def remove(self, drop) -> list[Example]:
        """Take out every example for which `drop(example)` is true; returns them (oldest first)."""
        kept, gone = [], []
        for e in self._items:
            (gone if drop(e) else kept).append(e)
        if gone:
            self._items = deque(kept, maxlen=self._items.maxlen)
        return gone

    def __iter__(self):
        return iter(self._items)

    def sample(self, k: int) -> list[Example]:
        k = min(k, len(self._items))
        return [self._items[i] for i in self._rng.sample(range(len(self._items)), k)] if k else []

    def state(self) -> list[list[Any]]:
        return [e.to_json() for e in self._items]

    def load_state(self, state: list[list[Any]]) -> None:
        self._items.clear()
        self._items.extend(Example.from_json(r) for r in state)
