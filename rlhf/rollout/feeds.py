"""The worker's two Kafka inputs, polled by one task.

- rlhf.policy-updates: every PolicyUpdate (any action) the learner publishes opens a new
  backpressure budget (budget.py); read from the start under a never-committed group, so
  a restarted worker knows the learner's last version at once.
- rlhf.interactions: live prompts, under the worker's consumer group; offsets are committed
  as soon as the prompts are buffered (at most once: a live prompt is a sample, not a record
  that must be processed). An empty or oversized prompt is dead-lettered to
  rlhf.interactions.dlq with the reason instead (sources.live_prompt_problem).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from rlhf.bus import EventConsumer, Topics, ensure_topics
from rlhf.rollout import metrics
from rlhf.rollout.sources import PromptMixer, live_prompt_problem
from rlhf.rollout.worker import RolloutLoop
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


# The reward service's default reward_max_prompt_chars: it would refuse to score a longer prompt.
MAX_LIVE_PROMPT_CHARS = 16_000


class BusFeeds:
    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        group_id: str,
        use_live: bool,
        max_prompt_chars: int = MAX_LIVE_PROMPT_CHARS,
    ):
        self.bootstrap, self.topics, self.group_id, self.use_live = bootstrap, topics, group_id, use_live
        self.max_prompt_chars = max_prompt_chars
        self.updates: EventConsumer | None = None
        self.interactions: EventConsumer | None = None

    def open(self) -> None:
        """Create (if needed) and assign the topics: blocking, run in a thread."""
        t = self.topics
        ensure_topics(
            self.bootstrap,
            [t.policy_updates, Topics.dlq(t.policy_updates), t.rollouts, t.interactions, Topics.dlq(t.interactions)],
        )
        self.updates = EventConsumer(
            self.bootstrap, t.policy_updates, events_pb2.PolicyUpdate, f"{self.group_id}-updates-{uuid.uuid4().hex[:8]}"
        )
        if self.use_live:
            self.interactions = EventConsumer(self.bootstrap, t.interactions, events_pb2.Interaction, self.group_id)

    async def run(self, loop: RolloutLoop, prompts: PromptMixer) -> None:
        while not loop.stopping.is_set():
            try:
                await self._poll(loop, prompts)
            except Exception:
                log.exception("polling Kafka failed; retrying")
                await asyncio.sleep(1.0)

    async def _poll(self, loop: RolloutLoop, prompts: PromptMixer) -> None:
        updates = await asyncio.to_thread(self.updates.poll, 200)
        if updates:
            await loop.on_policy_updates([r.event for r in updates])
        if self.interactions is None:
            return
        records = await asyncio.to_thread(self.interactions.poll, 200)
        for r in records:
            messages = [{"role": m.role, "content": m.content} for m in r.event.prompt]
            problem = live_prompt_problem(messages, self.max_prompt_chars)
            if problem is None:
                prompts.add_live(r.event.conversation_id, messages)
                continue
            log.warning("live prompt dead-lettered", extra={"event_id": r.event.event_id, "reason": str(problem)})
            await asyncio.to_thread(self.interactions.dead_letter, r, str(problem))
            metrics.LIVE_PROMPTS_INVALID.labels(problem.reason).inc()
        if records:
            metrics.LIVE_PROMPTS.inc(len(records))
            await asyncio.to_thread(self.interactions.commit)

    def close(self) -> None:
        for c in (self.updates, self.interactions):
            if c is not None:
                c.close()
