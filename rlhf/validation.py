"""Why a consumer refuses an event that decodes: one type for every consumer's checks.

The learner (rlhf.learner.batch), the reward service (rlhf.reward.data) and the rollout
worker (rlhf.rollout.sources) each check what their events *mean* and answer with an
`Invalid`; the consumer dead-letters the event with `str(invalid)` as the `dlq.error`
header (rlhf.bus.EventConsumer.dead_letter) and counts it by `reason`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Invalid:
    reason: str  # a few fixed words per consumer, the label of its metric (e.g. "token_id", "too_long")
    detail: str  # what is wrong, naming the field and the limit

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
