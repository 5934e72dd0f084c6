"""Where prompts come from: live traffic (rlhf.interactions) mixed with the bundled prompt set."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from rlhf.validation import Invalid


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    messages: list[dict]  # [{"role": ..., "content": ...}]
    source: str  # "live" or "prompt_set"
    origin: tuple[int, int] | None = None  # a live prompt's (partition, offset) in rlhf.interactions


def live_prompt_problem(messages: list[dict], max_chars: int) -> Invalid | None:
    """Why a live prompt (an Interaction's messages) must not be sent to Generate, or None.

    The reasons: "empty" (no messages, or nothing in them) and "too_long" (more characters
    than the reward service would score, so the group could only be dropped later).
    """
    if not messages:
        return Invalid("empty", "prompt: no messages")
    chars = sum(len(m["content"]) for m in messages)
    if chars == 0:
        return Invalid("empty", "prompt: every message is empty")
    if chars > max_chars:
        return Invalid("too_long", f"prompt: {chars} characters > limit {max_chars}")
    return None


class PromptMixer:
    """Takes a live prompt with probability `live_fraction` when one is waiting, else the next
    prompt-set prompt (the set is reshuffled on every pass). Live prompts are used once; the
    oldest are dropped when more than `live_buffer` wait."""

    def __init__(self, prompt_set: list[dict], live_fraction: float, live_buffer: int = 256, seed: int = 0):
        if not prompt_set:
            raise ValueError("the prompt set is empty")
        if not 0.0 <= live_fraction <= 1.0:
            raise ValueError(f"live_fraction must be in [0, 1], got {live_fraction}")
        self.prompt_set = prompt_set
        self.live_fraction = live_fraction
        self.live: deque[PromptItem] = deque(maxlen=live_buffer)
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def add_live(
        self, conversation_id: str, messages: list[dict], origin: tuple[int, int] | None = None
    ) -> list[PromptItem]:
        """Buffer a live prompt; returns those this call lets go unanswered: the new one if
        its last message is not the user's (nothing to answer), else the oldest waiting one
        if the buffer was full. The caller counts them as done (their offsets may be committed)."""
        item = PromptItem(f"live:{conversation_id}", messages, "live", origin)
        if not messages or messages[-1]["role"] != "user":
            return [item]
        evicted = [self.live[0]] if self.live.maxlen is not None and len(self.live) == self.live.maxlen else []
        self.live.append(item)
        return evicted

    def drop_live(self, partitions: set[int]) -> int:
        """Forget the waiting live prompts read from `partitions` (they went to another worker
        of the group, which reads them again from the committed offset); returns how many."""
        keep = [i for i in self.live if i.origin is None or i.origin[0] not in partitions]
        dropped = len(self.live) - len(keep)
        self.live.clear()
        self.live.extend(keep)
        return dropped

    def next(self) -> PromptItem:
        if self.live and self._rng.random() < self.live_fraction:
            return self.live.popleft()
        if not self._order:
            self._order = list(range(len(self.prompt_set)))
            self._rng.shuffle(self._order)
        record = self.prompt_set[self._order.pop()]
        return PromptItem(str(record["id"]), record["messages"], "prompt_set")
