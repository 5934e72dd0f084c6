"""Topic names, in one place, and the event type each topic carries.

Every service builds its topic names from `Topics(prefix)`, so one deployment can run
several loops side by side on one broker (and each test gets its own topics).
"""

from __future__ import annotations

import re

from google.protobuf.message import Message

from rlhf.v1 import events_pb2

# Kafka's legal topic characters; a prefix outside them fails later with an obscure
# broker error, so it is refused here with the rule.
_LEGAL = re.compile(r"[A-Za-z0-9._-]+")


class Topics:
    """The loop's topics under one prefix: `Topics("rlhf").policy_updates == "rlhf.policy-updates"`."""

    def __init__(self, prefix: str = "rlhf"):
        if not _LEGAL.fullmatch(prefix):
            raise ValueError(f"topic prefix {prefix!r} may use only letters, digits, '.', '_' and '-'")
        self.prefix = prefix
        self.feedback = f"{prefix}.feedback"  # Feedback, key conversation_id
        self.interactions = f"{prefix}.interactions"  # Interaction, key conversation_id
        self.rollouts = f"{prefix}.rollouts"  # Rollout, key prompt_id
        self.policy_updates = f"{prefix}.policy-updates"  # PolicyUpdate, key "policy"
        self.reward_updates = f"{prefix}.reward-updates"  # RewardModelUpdate, key "reward"
        # Feedback from raters the reward service quarantined (unreliable): kept, replayable, read by no service
        self.feedback_quarantine = f"{prefix}.feedback.quarantine"

    def events(self) -> dict[str, type[Message]]:
        """Each event topic and the protobuf message class its values decode to."""
        return {
            self.feedback: events_pb2.Feedback,
            self.interactions: events_pb2.Interaction,
            self.rollouts: events_pb2.Rollout,
            self.policy_updates: events_pb2.PolicyUpdate,
            self.reward_updates: events_pb2.RewardModelUpdate,
            self.feedback_quarantine: events_pb2.Feedback,
        }

    def message_class(self, topic: str) -> type[Message]:
        """The message class carried by `topic` (dead-letter topics carry raw bytes, not events)."""
        try:
            return self.events()[topic]
        except KeyError:
            raise KeyError(f"{topic!r} is not an event topic of prefix {self.prefix!r}") from None

    @staticmethod
    def dlq(topic: str) -> str:
        """The dead-letter twin of `topic`, where its undecodable messages go."""
        return topic + ".dlq"

    def consumed(self) -> list[str]:
        """The event topics a service of the loop reads: feedback (reward service),
        interactions (rollout worker), rollouts (learner), policy-updates (generators and
        rollout workers). The one left out, reward-updates, is an announcement: the reward
        service writes each RM version there (version, sha256, accuracy) for operators and
        tools; no service reads it (scoring replicas that would follow it: docs/reward.md)."""
        return [self.feedback, self.interactions, self.rollouts, self.policy_updates]

    def all(self) -> list[str]:
        """Every topic to create: the event topics, and a dead-letter twin for each one a
        service consumes (any consumer can meet a poison message; a topic nobody reads
        never dead-letters anything)."""
        return list(self.events()) + [self.dlq(t) for t in self.consumed()]
