"""From feedback events to training examples: de-duplication, thumbs pairing, replay buffer.

How ratings become training signal (the choice the issue asks to document):
  * a comparison is one Bradley-Terry pair (chosen ≻ rejected);
  * a thumbs rating that finds an *opposite* rating of a *different* answer to the same
    prompt (same conversation messages) among the recent ratings becomes a Bradley-Terry
    pair (up ≻ down), the cleanest signal a rating can give;
  * any other rating (the first one for its prompt, or one that agrees with the earlier
    ones) trains a pointwise logistic term −log σ(±r): thumbs are absolute judgements,
    and waiting for a partner that may never come would drop most of them.
A rating that first trained pointwise and later completes a pair therefore counts in
both forms, each once: feedback is consumed once, in arrival order, never re-labelled.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

PAIR = "pair"
POINT = "point"

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclass(frozen=True)
class Example:
    """One unit of reward-model training signal.

    kind == "pair":  chosen ≻ rejected for prompt
    kind == "point": response rated label (+1 up, −1 down) for prompt
    """

    kind: str
    prompt: Messages
    chosen: str = ""
    rejected: str = ""
    response: str = ""
    label: int = 0
    event_id: str = ""

    def texts(self) -> list[str]:
        return [self.chosen, self.rejected] if self.kind == PAIR else [self.response]

    def to_json(self) -> list[Any]:
        return [self.kind, [list(m) for m in self.prompt], self.chosen, self.rejected, self.response,
                self.label, self.event_id]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> "Example":
        kind, prompt, chosen, rejected, response, label, event_id = row
        return cls(kind, tuple((r, c) for r, c in prompt), chosen, rejected, response, int(label), event_id)


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


class FeedbackConverter:
    """Feedback events → Examples, remembering the last ratings of recent prompts to pair them."""

    def __init__(self, max_prompts: int = 10_000, per_prompt: int = 4):
        self.max_prompts = max_prompts
        self.per_prompt = per_prompt
        # prompt key → [(response, value)], most recent last; LRU over prompts
        self._ratings: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()

    def convert(self, fb: Any) -> tuple[str, list[Example], str]:
        """(kind, examples, problem) for one events_pb2.Feedback. kind is "comparison",
        "thumbs" or "unknown"; problem is "" or why the event carries no training signal."""
        prompt = messages_of(fb.prompt)
        which = fb.WhichOneof("kind")
        if which == "comparison":
            c = fb.comparison
            if not c.chosen or not c.rejected:
                return "comparison", [], "empty_response"
            if c.chosen == c.rejected:
                return "comparison", [], "identical_responses"
            return "comparison", [Example(PAIR, prompt, chosen=c.chosen, rejected=c.rejected, event_id=fb.event_id)], ""
        if which == "rating":
            r = fb.rating
            if not r.response:
                return "thumbs", [], "empty_response"
            if r.value == 0:
                return "thumbs", [], "zero_rating"
            return "thumbs", [self._rate(prompt, r.response, 1 if r.value > 0 else -1, fb.event_id)], ""
        return "unknown", [], "no_rating_or_comparison"

    def _rate(self, prompt: Messages, response: str, value: int, event_id: str) -> Example:
        key = prompt_key(prompt)
        seen = self._ratings.pop(key, [])
        partner = next((resp for resp, v in reversed(seen) if v == -value and resp != response), None)
        seen = (seen + [(response, value)])[-self.per_prompt:]
        self._ratings[key] = seen
        while len(self._ratings) > self.max_prompts:
            self._ratings.popitem(last=False)
        if partner is None:
            return Example(POINT, prompt, response=response, label=value, event_id=event_id)
        chosen, rejected = (response, partner) if value > 0 else (partner, response)
        return Example(PAIR, prompt, chosen=chosen, rejected=rejected, event_id=event_id)

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

    def sample(self, k: int) -> list[Example]:
        k = min(k, len(self._items))
        return [self._items[i] for i in self._rng.sample(range(len(self._items)), k)] if k else []

    def state(self) -> list[list[Any]]:
        return [e.to_json() for e in self._items]

    def load_state(self, state: list[list[Any]]) -> None:
        self._items.clear()
        self._items.extend(Example.from_json(r) for r in state)
