"""The worker's two Kafka inputs, polled by one task.

- rlhf.policy-updates: every PolicyUpdate (any action) moves the backpressure budget on;
  read from the start under a never-committed group, so a restarted worker knows the
  newest version at once.
- rlhf.interactions: live prompts, under the worker's consumer group; offsets are committed
  as soon as the prompts are buffered (at most once: a live prompt is a sample, not a record
  that must be processed).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from rlhf.bus import EventConsumer, Topics, ensure_topics
from rlhf.rollout import metrics
from rlhf.rollout.sources import PromptMixer
from rlhf.rollout.worker import RolloutLoop
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


class BusFeeds:
    def __init__(self, bootstrap: str, topics: Topics, group_id: str, use_live: bool):
        self.bootstrap, self.topics, self.group_id, self.use_live = bootstrap, topics, group_id, use_live
        self.updates: EventConsumer | None = None
        self.interactions: EventConsumer | None = None

    def open(self) -> None:
        """Create (if needed) and assign the topics: blocking, run in a thread."""
        t = self.topics
        ensure_topics(self.bootstrap, [t.policy_updates, Topics.dlq(t.policy_updates), t.rollouts,
                                       t.interactions, Topics.dlq(t.interactions)])
        self.updates = EventConsumer(self.bootstrap, t.policy_updates, events_pb2.PolicyUpdate,
                                     f"{self.group_id}-updates-{uuid.uuid4().hex[:8]}")
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
        for r in await asyncio.to_thread(self.updates.poll, 200):
            loop.observe(r.event.version)
        if self.interactions is None:
            return
        records = await asyncio.to_thread(self.interactions.poll, 200)
        for r in records:
            prompts.add_live(r.event.conversation_id, [{"role": m.role, "content": m.content} for m in r.event.prompt])
        if records:
            metrics.LIVE_PROMPTS.inc(len(records))
            await asyncio.to_thread(self.interactions.commit)

    def close(self) -> None:
        for c in (self.updates, self.interactions):
            if c is not None:
                c.close()
