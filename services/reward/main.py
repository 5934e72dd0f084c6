"""Reward service: scores (prompt, response) with r_φ and trains it online from feedback."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.serving.batcher import MicroBatcher, submit_or_abort
from rlhf.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)


class RewardSettings(GrpcServiceSettings):
    port: int = Field(50052, description="gRPC port")
    metrics_port: int = Field(9102, description="Prometheus /metrics HTTP port; 0 disables it")
    reward_backbone: str = Field(
        "minilm", description='"minilm" (all-MiniLM-L6-v2), "tiny" (random tiny BERT, tests), "policy" (RLHF_MODEL) or a folder'
    )
    model: str = Field("demo", description='policy weights, used only when reward_backbone is "policy"')
    reward_max_items: int = Field(256, description="most (prompt, response) items in one Score call")
    reward_max_prompt_chars: int = Field(16_000, description="most characters in one item's prompt (all messages)")
    reward_max_response_chars: int = Field(8_000, description="most characters in one item's response")
    reward_max_tokens: int = Field(256, description="tokens the RM reads per item; longer text is truncated")
    reward_score_batch_size: int = Field(64, description="items per RM forward pass when scoring")
    reward_max_wait_ms: float = Field(2.0, description="how long a lone Score call waits for others to batch with")
    reward_train_batch_size: int = Field(16, description="new examples per training step")
    reward_replay_ratio: float = Field(1.0, description="replayed examples mixed in per new example")
    reward_replay_size: int = Field(20_000, description="examples kept in the replay buffer")
    reward_lr: float = Field(2e-5, description="AdamW learning rate of the RM")
    reward_max_grad_norm: float = Field(1.0, description="gradient clipping norm")
    reward_accuracy_window: int = Field(512, description="validated examples the online accuracy averages over")
    reward_norm_window: float = Field(10_000, description="effective memory of the score normaliser, in scores")
    reward_norm_clip: float = Field(5.0, description="normalised scores are clipped to ±this")
    reward_dedup_capacity: int = Field(200_000, description="feedback event ids remembered for de-duplication")
    reward_publish_every_steps: int = Field(20, description="publish a new RM version every N training steps")
    reward_checkpoint_every_steps: int = Field(100, description="checkpoint and commit offsets every N steps")
    reward_checkpoint_every_seconds: float = Field(60.0, description="... or after this long with unsaved progress")
    reward_checkpoint_when_idle: bool = Field(True, description="also checkpoint whenever rlhf.feedback runs dry")
    reward_keep_versions: int = Field(5, description="RM versions kept on disk (plus those checkpoints name)")
    reward_poll_timeout_ms: int = Field(500, description="how long one poll of rlhf.feedback waits")
    reward_max_poll_records: int = Field(256, description="feedback events per poll")
    reward_group_id: str = Field("reward", description="Kafka consumer group of the feedback consumer")
    reward_seed: int = Field(0, description="seed of the RM head initialisation and replay sampling")
    reward_device: str = Field("auto", description='"auto" (cuda if present), "cpu" or "cuda[:n]"')
    reward_torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default (all cores)")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, service: "RewardService"):
        self.service = service

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        from rlhf.reward import messages_of

        svc = self.service
        if svc.snapshot is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "reward model is still loading")
        problem = svc.validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        items = [(messages_of(it.prompt), it.response) for it in request.items]
        results = await submit_or_abort(svc.batcher, items, context, "reward", "scoring")
        version = results[0][2] if results else svc.snapshot.version
        return reward_pb2.ScoreResponse(
            scores=[n for _, n, _ in results], raw_scores=[r for r, _, _ in results], rm_version=version
        )

    async def GetInfo(self, request: reward_pb2.RewardInfoRequest, context: grpc.aio.ServicerContext):
        svc = self.service
        if svc.snapshot is None or svc.loop is None or svc.loop.trainer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "reward model is still loading")
        tr = svc.loop.trainer
        return reward_pb2.RewardInfo(
            rm_version=svc.snapshot.version, train_step=tr.step, online_accuracy=tr.online_accuracy,
            pairs_seen=tr.pairs_seen, examples_seen=tr.examples_seen, backbone=svc.settings.reward_backbone,
        )


class RewardService(Service):
    name = "reward"
    grpc_services = ("rlhf.v1.RewardService",)

    def __init__(self, settings: RewardSettings):
        self.settings = settings
        self.snapshot = None  # rlhf.reward.online.ServingSnapshot, replaced whole on each version
        self.loop = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None
        self.batcher = MicroBatcher(self._score, settings.reward_score_batch_size, settings.reward_max_wait_ms,
                                    name="reward")

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self), server)

    async def start(self) -> None:
        await asyncio.to_thread(self._start_blocking)
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop,), name="rm-train", daemon=True)
        self._thread.start()

    def _start_blocking(self) -> None:
        """Weights loaded (checkpoint or fresh) and the feedback consumer assigned: then SERVING."""
        from rlhf.bus import EventConsumer, EventProducer, Topics, ensure_topics
        from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, resolve_backbone
        from rlhf.reward.model import resolve_device
        from rlhf.reward.checkpoint import RewardCheckpoints
        from rlhf.reward.online import LoopConfig, OnlineRewardLoop
        from rlhf.v1 import events_pb2

        s = self.settings
        if s.reward_torch_threads > 0:
            import torch

            torch.set_num_threads(s.reward_torch_threads)
        topics = Topics(s.topic_prefix)
        ensure_topics(s.kafka_bootstrap, [topics.feedback, Topics.dlq(topics.feedback), topics.reward_updates])
        spec = resolve_backbone(s.reward_backbone, policy_model=s.model)
        base = load_reward_model(spec, max_tokens=s.reward_max_tokens, head_seed=s.reward_seed,
                                 device=resolve_device(s.reward_device))
        cfg = TrainerConfig(
            lr=s.reward_lr, batch_size=s.reward_train_batch_size, replay_ratio=s.reward_replay_ratio,
            replay_capacity=s.reward_replay_size, max_grad_norm=s.reward_max_grad_norm,
            accuracy_window=s.reward_accuracy_window, norm_window=s.reward_norm_window,
            norm_clip=s.reward_norm_clip, dedup_capacity=s.reward_dedup_capacity, seed=s.reward_seed,
        )
        self._producer = EventProducer(s.kafka_bootstrap, client_id="reward")

        def make_consumer():
            return EventConsumer(s.kafka_bootstrap, topics.feedback, events_pb2.Feedback, s.reward_group_id,
                                 dlq_producer=self._producer, client_id="reward-feedback")

        self.loop = OnlineRewardLoop(
            make_trainer=lambda: OnlineRewardTrainer(base.clone(), cfg),
            make_consumer=make_consumer,
            producer=self._producer,
            updates_topic=topics.reward_updates,
            checkpoints=RewardCheckpoints(s.state_dir / "reward", keep_versions=s.reward_keep_versions),
            backbone=spec,
            cfg=LoopConfig(
                publish_every_steps=s.reward_publish_every_steps, checkpoint_every_steps=s.reward_checkpoint_every_steps,
                checkpoint_every_seconds=s.reward_checkpoint_every_seconds,
                checkpoint_when_idle=s.reward_checkpoint_when_idle, poll_timeout_ms=s.reward_poll_timeout_ms,
                max_poll_records=s.reward_max_poll_records,
            ),
            on_swap=self._swap,
        )
        self.loop.restore()
        if not self.loop.assigned:
            raise RuntimeError(f"feedback consumer has no partitions of {topics.feedback}")

    def _swap(self, snapshot) -> None:
        self.snapshot = snapshot  # one reference assignment: a batch sees the old or the new version whole

    def _score(self, items: list[tuple]) -> list[tuple[float, float, int]]:
        """On the batcher's thread: one snapshot (version) for the whole batch."""
        from rlhf.reward.metrics import SCORED

        snap = self.snapshot
        raw, norm = snap.score([p for p, _ in items], [r for _, r in items], self.settings.reward_score_batch_size)
        SCORED.inc(len(items))
        return [(float(a), float(b), snap.version) for a, b in zip(raw.tolist(), norm.tolist())]

    def validate(self, request: reward_pb2.ScoreRequest) -> str:
        """Why the request cannot be served, naming the field and the limit; "" if it can."""
        s = self.settings
        if len(request.items) > s.reward_max_items:
            return f"items: {len(request.items)} items > limit {s.reward_max_items} (RLHF_REWARD_MAX_ITEMS)"
        for i, it in enumerate(request.items):
            n = sum(len(m.content) for m in it.prompt)
            if n > s.reward_max_prompt_chars:
                return f"items[{i}].prompt: {n} characters > limit {s.reward_max_prompt_chars} (RLHF_REWARD_MAX_PROMPT_CHARS)"
            if len(it.response) > s.reward_max_response_chars:
                return (f"items[{i}].response: {len(it.response)} characters > limit "
                        f"{s.reward_max_response_chars} (RLHF_REWARD_MAX_RESPONSE_CHARS)")
        return ""

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 120)
        await self.batcher.close()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(RewardSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reward")
    return run_service(RewardService(settings), settings)
