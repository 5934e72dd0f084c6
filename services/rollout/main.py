"""Rollout worker: prompts → Generate(n) → Score → LogProbs → Kafka rlhf.rollouts.

It serves no RPC of its own, only the standard health service and metrics, so that
orchestrators probe it the same way as every other service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Sequence

import grpc

from rlhf.rollout.worker import WorkerConfig
from rlhf.serving import Service, load_settings, run_service
from rlhf.serving.settings import config_from
from services.rollout.settings import (
    ANNOUNCED_BY_THE_LEARNER,
    GROUP_PREFIX,
    PREFIX,
    RolloutSettings,
    _RolloutSettingsBase,
)

log = logging.getLogger(__name__)


class RolloutWorker(Service):
    name = "rollout"
    grpc_services = ()

    def __init__(self, settings: _RolloutSettingsBase):
        self.settings = settings
        self.loop = None
        self.feeds = None
        self._tasks: list[asyncio.Task] = []

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self) -> None:
        from rlhf.bus import EventProducer, Topics
        from rlhf.bus.consumer import GroupConfig
        from rlhf.rollout import TRAIN, PolicyBudget, PromptMixer, RolloutLoop, load_prompts
        from rlhf.rollout.feeds import BusFeeds
        from rlhf.serving.client import aio_channel

        s = self.settings
        topics = Topics(s.topic_prefix)
        prompts = PromptMixer(
            load_prompts(TRAIN if s.prompt_set == "train" else s.prompt_set),
            s.live_fraction,
            s.live_buffer,
            seed=s.rollout_seed,
        )
        self.feeds = BusFeeds(
            s.kafka_bootstrap,
            topics,
            s.rollout_group_id,
            use_live=s.live_fraction > 0,
            group=config_from(s, GroupConfig, GROUP_PREFIX),
        )
        await asyncio.to_thread(self.feeds.open)
        self.producer = await asyncio.to_thread(EventProducer, s.kafka_bootstrap, "rollout")
        self.channels = [aio_channel(a, s.max_message_mb) for a in (s.generator_addr, s.reward_addr, s.reference_addr)]
        learner = aio_channel(s.learner_addr) if s.learner_addr else None
        for var, owner in ANNOUNCED_BY_THE_LEARNER.items():
            if var in os.environ:
                log.warning(f"{var} is ignored: the learner announces it ({owner}) in its PolicyUpdates")
        # the budget stays closed until the learner's first PolicyUpdate brings its numbers
        self.loop = RolloutLoop(
            config_from(s, WorkerConfig, PREFIX),
            prompts,
            PolicyBudget(),
            self.producer,
            topics.rollouts,
            *self.channels,
            learner=learner,
        )
        if learner is not None:
            self.channels.append(learner)
        self._tasks = [
            asyncio.create_task(self.feeds.run(self.loop, prompts), name="rollout-feeds"),
            asyncio.create_task(self.loop.run(), name="rollout-loop"),
        ]

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.stopping.set()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for ch in getattr(self, "channels", []):
            await ch.close()
        if self.feeds is not None:
            self.feeds.close()
        if getattr(self, "producer", None) is not None:
            await asyncio.to_thread(self.producer.close)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(RolloutSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-rollout")
    return run_service(RolloutWorker(settings), settings)
