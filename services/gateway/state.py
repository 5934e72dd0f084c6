"""The gateway's long-lived parts, opened at start-up and closed after the drain: the
generator and reward channels, the SQLite store with its outbox, and the relay thread to Kafka;
and the canary's traffic split (issue 15, docs/canary.md): which version answers a conversation.

The split: the generator's GetInfo says the stable version, the candidate (0: none) and the
candidate's share, reused for canary_info_ttl_seconds. A conversation is answered by the
version it was answered by before while that version is still served (a bounded LRU of
conversation ids, canary_pinned_conversations); a new one by `rlhf.canary.assign`, the
sticky SHA-256 split, so every replica agrees. Without a candidate the request names no
version (0: the generator's stable one), and the conversation is pinned to what answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.bus import Topics
from rlhf.canary import assign
from rlhf.outbox import KafkaPublisher, Outbox, Relay
from rlhf.serving.client import aio_channel
from rlhf.v1 import generation_pb2, generation_pb2_grpc, reward_pb2_grpc
from services.gateway.settings import GatewaySettings
from services.gateway.store import GatewayStore

log = logging.getLogger("gateway")


class Gateway:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.started = int(time.time())
        self.model_name = settings.model_name or "policy"
        self.policy_version = 0  # the stable version, as the generator last said
        self.candidate_version = 0  # the candidate in canary (0: none), from GetInfo
        self.canary_share = 0.0
        self._info_at = -float("inf")  # time.monotonic() of the last GetInfo answer
        self._pins: OrderedDict[str, int] = OrderedDict()  # conversation id → the version that answered it
        self.generator_status = "UNKNOWN"

        self.outbox = Outbox(settings.outbox_file(), settings.outbox_synchronous)
        self.relay = Relay(
            self.outbox,
            KafkaPublisher(
                settings.kafka_bootstrap, "rlhf-gateway", topics=[self.topics.feedback, self.topics.interactions]
            ),
            interval=settings.relay_interval_seconds,
            batch=settings.relay_batch,
            max_backoff=settings.relay_max_backoff_seconds,
            publish_timeout=settings.relay_publish_timeout_seconds,
            retention=settings.outbox_retention_seconds,
        )
        self.store = GatewayStore(
            self.outbox,
            self.topics,
            on_commit=self.relay.wake,
            completion_synchronous=settings.interaction_synchronous,
            redact_pii=settings.redact_pii,
        )
        self.channel = aio_channel(settings.generator_addr)
        self.generator = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        # only compare_selection=rm_uncertain|rm_extremes and serve_best_of call it; a channel connects
        # on first use, so an absent reward service costs nothing until then (and then a counted fallback)
        self.reward_channel = aio_channel(settings.reward_addr)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.reward_channel)
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self.relay.start()
        self._watch = asyncio.create_task(self._watch_generator())

    async def refresh_info(self) -> None:
        """Model name and serving policy version from the generator (kept as they were if it is away)."""
        try:
            info = await self.generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=2)
        except grpc.RpcError:
            return
        self.policy_version = info.policy_version
        self.candidate_version = info.candidate_version
        self.canary_share = info.canary_share if info.candidate_version else 0.0
        self._info_at = time.monotonic()
        if not self.settings.model_name and info.model:
            self.model_name = info.model.rstrip("/").rsplit("/", 1)[-1]

    # --- the canary's split ----------------------------------------------------------------
    async def serving(self) -> tuple[int, int, float]:
        """(stable, candidate or 0, candidate's share), at most canary_info_ttl_seconds old."""
        if time.monotonic() - self._info_at > self.settings.canary_info_ttl_seconds:
            await self.refresh_info()
        return self.policy_version, self.candidate_version, self.canary_share

    async def version_for(self, conversation_id: str) -> int:
        """GenerateRequest.policy_version for a turn of this conversation: the version pinned
        to it while that is served, else the split's pick; 0 (the stable one) with no candidate."""
        stable, candidate, share = await self.serving()
        pinned = self._pins.get(conversation_id)
        if pinned is not None and pinned in (stable, candidate):
            self._pins.move_to_end(conversation_id)
            return pinned if candidate else 0
        if not candidate:
            return 0
        version = assign(conversation_id, share, stable=stable, candidate=candidate)
        self.pin(conversation_id, version)
        return version

    def pin(self, conversation_id: str, version: int) -> None:
        """Remember which version answered the conversation (bounded: the oldest go first)."""
        limit = self.settings.canary_pinned_conversations
        if limit <= 0:
            return
        self._pins[conversation_id] = version
        self._pins.move_to_end(conversation_id)
        while len(self._pins) > limit:
            self._pins.popitem(last=False)

    def unpin(self, conversation_id: str) -> None:
        self._pins.pop(conversation_id, None)

    def role(self, version: int) -> str:
        """stable or candidate: the metric label for the version that answered."""
        return "candidate" if self.candidate_version and version == self.candidate_version else "stable"

    async def _watch_generator(self, period: float = 2.0) -> None:
        """Readiness follows the generator's health; also prunes old responses hourly."""
        last_prune = 0.0
        while True:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=period)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError:
                status = "UNREACHABLE"
            if status != self.generator_status:
                log.info("generator health", extra={"status": status, "address": self.settings.generator_addr})
                self.generator_status = status
                if status == "SERVING":
                    await self.refresh_info()
            if time.monotonic() - last_prune > 3600:
                last_prune = time.monotonic()
                try:
                    await self.store.prune_responses(self.settings.response_retention_hours * 3600)
                except Exception:  # noqa: BLE001 - retried next hour
                    log.exception("pruning served responses failed")
            await asyncio.sleep(period)

    async def close(self, flush_timeout: float = 0.0) -> None:
        """After the HTTP drain: give the relay `flush_timeout` to empty the outbox, then close."""
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.to_thread(self.relay.stop, flush_timeout)
        self.store.close()
        self.outbox.close()
        await self.channel.close()
        await self.reward_channel.close()
