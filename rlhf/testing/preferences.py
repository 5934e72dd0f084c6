"""A synthetic preference that a reward model can learn fast: answers containing a
keyword are better. Feeds tests, the benchmark and demos with Feedback events."""

from __future__ import annotations

import random

from rlhf.v1 import common_pb2, events_pb2

KEYWORD = "please"
_WORDS = (
    "the a model answer river mountain blue green quick slow data train music paper light "
    "window garden city coffee morning evening table chair book story simple clear small large "
    "question idea number water stone cloud winter summer road bridge market voice friend "
    "little bright quiet early late open close run walk read write build find keep think"
).split()
_QUESTIONS = (
    "How do I make tea?",
    "What is a river?",
    "Tell me about mountains.",
    "Explain gravity.",
    "Write a short poem.",
    "What should I read?",
    "How do bridges work?",
    "Describe a city.",
)


class SyntheticPreference:
    """Pairs (chosen has the keyword, rejected has not) and ratings (+1 iff keyword)."""

    def __init__(self, seed: int = 0, keyword: str = KEYWORD, min_words: int = 5, max_words: int = 12):
        self.rng = random.Random(seed)
        self.keyword, self.min_words, self.max_words = keyword, min_words, max_words

    def prompt(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.rng.choice(_QUESTIONS)}]

    def response(self, good: bool) -> str:
        words = [self.rng.choice(_WORDS) for _ in range(self.rng.randint(self.min_words, self.max_words))]
        if good:
            words.insert(self.rng.randint(0, len(words)), self.keyword)
        return " ".join(words)

    def pair(self) -> tuple[list[dict[str, str]], str, str]:
        """(prompt, chosen, rejected)"""
        return self.prompt(), self.response(True), self.response(False)

    def comparison_event(self, event_id: str | None = None) -> events_pb2.Feedback:
        from rlhf.bus import new_event

        prompt, chosen, rejected = self.pair()
        extra = {"event_id": event_id} if event_id else {}
        return new_event(
            events_pb2.Feedback,
            conversation_id=f"c{self.rng.getrandbits(48):x}",
            source="simulated",
            prompt=[common_pb2.ChatMessage(**m) for m in prompt],
            comparison=events_pb2.Comparison(chosen=chosen, rejected=rejected),
            **extra,
        )

    def rating_event(self, prompt: list[dict[str, str]] | None = None, good: bool | None = None) -> events_pb2.Feedback:
        from rlhf.bus import new_event

        good = self.rng.random() < 0.5 if good is None else good
        return new_event(
            events_pb2.Feedback,
            conversation_id=f"c{self.rng.getrandbits(48):x}",
            source="simulated",
            prompt=[common_pb2.ChatMessage(**m) for m in (prompt or self.prompt())],
            rating=events_pb2.Rating(response=self.response(good), value=1 if good else -1),
        )
