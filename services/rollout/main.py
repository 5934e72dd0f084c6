"""Rollout worker: prompts → Generate(n) → Score → LogProbs → Kafka rlhf.rollouts.

It serves no RPC of its own, only the standard health service and metrics, so that
orchestrators probe it the same way as every other service.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service


class RolloutSettings(GrpcServiceSettings):
    port: int = Field(50055, description="gRPC port (health only)")
    metrics_port: int = Field(9105, description="Prometheus /metrics HTTP port; 0 disables it")
    generator_addr: str = Field("127.0.0.1:50051", description="GenerationService address")
    reward_addr: str = Field("127.0.0.1:50052", description="RewardService address")
    reference_addr: str = Field("127.0.0.1:50053", description="ReferenceService address")
    samples_per_prompt: int = Field(4, description="responses sampled per prompt (one Generate call, n samples)")
    rollout_temperature: float = Field(1.0, description="sampling temperature; log-probs are always of π itself (T=1)")
    rollout_top_p: float = Field(1.0, description="nucleus sampling mass")
    rollout_max_tokens: int = Field(64, description="most tokens per sampled response")
    prompt_set: str = Field("train", description='"train" (bundled rlhf/data/prompts_train.jsonl) or a .jsonl/.txt file')
    live_fraction: float = Field(0.5, description="share of prompts taken from live traffic when live prompts wait")
    live_buffer: int = Field(256, description="live prompts kept waiting; the oldest are dropped beyond this")
    rollouts_per_version: int = Field(16, description="rollouts the learner turns into one version (its batch_size × publish_every)")
    max_policy_lag: int = Field(2, description="versions the worker may run ahead: budget = rollouts_per_version × (lag + 1)")
    rollout_concurrency: int = Field(2, description="prompt groups in flight at once")
    generate_timeout_s: float = Field(120.0, description="deadline of one Generate call")
    score_timeout_s: float = Field(30.0, description="deadline of one Score call")
    reference_timeout_s: float = Field(30.0, description="deadline of one LogProbs call")
    max_backoff_s: float = Field(10.0, description="longest wait between retries of an UNAVAILABLE service")
    version_poll_s: float = Field(1.0, description="while held back: how often to ask the generator for its version")
    min_rm_examples: int = Field(32, description="make no rollout before the reward model has trained on this many "
                                                 "feedback examples (0: start at once, against the untrained RM)")
    rollout_group_id: str = Field("rollout", description="Kafka consumer group of the live-prompt consumer")
    rollout_seed: int = Field(0, description="seed of the prompt order and the live/prompt-set mix")


class RolloutWorker(Service):
    name = "rollout"
    grpc_services = ()

    def __init__(self, settings: RolloutSettings):
        self.settings = settings
        self.loop = None
        self.feeds = None
        self._tasks: list[asyncio.Task] = []

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self) -> None:
        from rlhf.bus import EventProducer, Topics
        from rlhf.rollout import TRAIN, PolicyBudget, PromptMixer, RolloutLoop, WorkerConfig, load_prompts
        from rlhf.rollout.feeds import BusFeeds
        from rlhf.serving.client import aio_channel

        s = self.settings
        topics = Topics(s.topic_prefix)
        prompts = PromptMixer(load_prompts(TRAIN if s.prompt_set == "train" else s.prompt_set), s.live_fraction,
                              s.live_buffer, seed=s.rollout_seed)
        self.feeds = BusFeeds(s.kafka_bootstrap, topics, s.rollout_group_id, use_live=s.live_fraction > 0)
        await asyncio.to_thread(self.feeds.open)
        self.producer = await asyncio.to_thread(EventProducer, s.kafka_bootstrap, "rollout")
        self.channels = [aio_channel(a, s.max_message_mb) for a in (s.generator_addr, s.reward_addr, s.reference_addr)]
        cfg = WorkerConfig(
            samples_per_prompt=s.samples_per_prompt, temperature=s.rollout_temperature, top_p=s.rollout_top_p,
            max_tokens=s.rollout_max_tokens, concurrency=s.rollout_concurrency, generate_timeout_s=s.generate_timeout_s,
            score_timeout_s=s.score_timeout_s, reference_timeout_s=s.reference_timeout_s,
            max_backoff_s=s.max_backoff_s, version_poll_s=s.version_poll_s, min_rm_examples=s.min_rm_examples,
        )
        self.loop = RolloutLoop(cfg, prompts, PolicyBudget(s.rollouts_per_version, s.max_policy_lag), self.producer,
                                topics.rollouts, *self.channels)
        self._tasks = [asyncio.create_task(self.feeds.run(self.loop, prompts), name="rollout-feeds"),
                       asyncio.create_task(self.loop.run(), name="rollout-loop")]

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
