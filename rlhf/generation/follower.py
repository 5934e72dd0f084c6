"""Follows `PolicyUpdate` events on Kafka and loads the versions a generator should serve.

Every generator replica must see every update, so each reads the whole topic under its own
never-committed consumer group: on start it replays the topic (a few events per version) and
loads the last PROMOTED or ROLLED_BACK version, then follows new events. PROMOTED loads a
version newer than the one serving; ROLLED_BACK loads its version whatever it is; REJECTED is
ignored. A refused or failed load is logged and counted; the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from prometheus_client import Counter

from rlhf.bus import EventConsumer, Topics, ensure_topics
from rlhf.generation.generator import Generator
from rlhf.generation.weights import FULL, LORA
from rlhf.generation.types import WeightsRefused
from rlhf.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

POLICY_EVENTS = Counter("rlhf_generator_policy_events_total", "PolicyUpdate events seen, by action and outcome", ["action", "outcome"])

PROMOTED, ROLLED_BACK = events_pb2.POLICY_ACTION_PROMOTED, events_pb2.POLICY_ACTION_ROLLED_BACK
_FORMATS = {common_pb2.WEIGHT_FORMAT_FULL: FULL, common_pb2.WEIGHT_FORMAT_LORA: LORA}


class PolicyFollower:
    def __init__(self, generator: Generator, bootstrap: str, topic: str, name: str = "generator"):
        self.gen = generator
        self.bootstrap, self.topic = bootstrap, topic
        self.group_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.consumer: EventConsumer | None = None

    async def catch_up(self) -> None:
        """Assign the topic, replay it to its end, and serve the last version it settles on."""
        await asyncio.to_thread(ensure_topics, self.bootstrap, [self.topic, Topics.dlq(self.topic)])
        self.consumer = await asyncio.to_thread(
            EventConsumer, self.bootstrap, self.topic, events_pb2.PolicyUpdate, self.group_id, mode="assign"
        )
        last = None
        while True:
            records = await asyncio.to_thread(self.consumer.poll, 500)
            for r in records:
                if r.event.action in (PROMOTED, ROLLED_BACK):
                    last = r.event
            if not records and sum((await asyncio.to_thread(self.consumer.lag)).values()) == 0:
                break
        if last is not None and last.version != self.gen.version:
            await self._load(last, replay=True)

    async def run(self) -> None:
        """Follow new events until cancelled; a broker outage is logged and waited out."""
        while True:
            try:
                records = await asyncio.to_thread(self.consumer.poll, 1000)
            except Exception:
                log.exception("polling policy updates failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for r in records:
                ev = r.event
                if ev.action == ROLLED_BACK or (ev.action == PROMOTED and ev.version > self.gen.version):
                    await self._load(ev)
                else:
                    POLICY_EVENTS.labels(events_pb2.PolicyAction.Name(ev.action), "ignored").inc()

    async def _load(self, ev: events_pb2.PolicyUpdate, replay: bool = False) -> None:
        action = events_pb2.PolicyAction.Name(ev.action)
        try:
            await self.gen.load_version(ev.version, ev.uri, ev.sha256, _FORMATS.get(ev.format, ""))
        except WeightsRefused as e:
            POLICY_EVENTS.labels(action, "refused").inc()
            log.error("policy update refused", extra={"version": ev.version, "reason": str(e)})
            return
        except Exception:
            POLICY_EVENTS.labels(action, "failed").inc()
            log.exception("policy update failed", extra={"version": ev.version})
            return
        POLICY_EVENTS.labels(action, "loaded").inc()
        log.info("policy update loaded", extra={"version": ev.version, "action": action, "replay": replay})

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
