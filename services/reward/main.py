"""Reward service: scores (prompt, response) with r_φ and trains it online from feedback.

`RLHF_REWARD_ROLE=scorer` runs a scorer replica instead: Score with the newest version the
trainer wrote to the reward store, no training (rlhf/reward/follower.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Sequence

import grpc

from rlhf.reward.config import LoopConfig, TrainerConfig
from rlhf.reward.reliability import ReliabilityConfig
from rlhf.reward.servicer import RewardServicer
from rlhf.serving import Service, load_settings, run_service
from rlhf.serving.settings import config_from
from rlhf.v1 import reward_pb2_grpc
from services.reward.settings import PREFIX, RELIABILITY_PREFIX, RewardSettings, _RewardSettingsBase

log = logging.getLogger(__name__)


class RewardService(Service):
    name = "reward"
    grpc_services = ("rlhf.v1.RewardService",)

    def __init__(self, settings: _RewardSettingsBase):
        self.settings = settings
        self.loop = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None
        self._writer = None  # held from start to stop: one reward trainer per state dir
        self.follower = None  # role scorer: rlhf.reward.follower.RewardFollower
        self.servicer = RewardServicer(
            backbone=settings.reward_backbone,
            max_items=settings.reward_max_items,
            max_prompt_chars=settings.reward_max_prompt_chars,
            max_response_chars=settings.reward_max_response_chars,
            score_batch_size=settings.reward_score_batch_size,
            max_wait_ms=settings.reward_max_wait_ms,
            role=settings.reward_role,
        )

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        if self.settings.reward_role == "scorer":
            await asyncio.to_thread(self._start_scorer)
            self._thread = threading.Thread(target=self.follower.run, args=(self._stop,), name="rm-follow", daemon=True)
            self._thread.start()
            return
        from rlhf.durability import writer_lock

        # single writer: a second reward trainer on this state dir would train from the same
        # offsets and overwrite the same checkpoints; it fails here, naming the holder
        self._writer = writer_lock(self.settings.state_dir / "reward" / "writer.lock", "reward trainer").acquire()
        await asyncio.to_thread(self._start_blocking)
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop,), name="rm-train", daemon=True)
        self._thread.start()

    def _start_blocking(self) -> None:
        """Weights loaded (checkpoint or fresh) and the feedback consumer assigned: then SERVING."""
        from rlhf.bus import EventConsumer, EventProducer, Topics, ensure_topics
        from rlhf.models import resolve_device, set_torch_threads
        from rlhf.reward import OnlineRewardTrainer, load_reward_model, resolve_backbone
        from rlhf.reward.checkpoint import RewardCheckpoints
        from rlhf.reward.online import OnlineRewardLoop, read_quarantined
        from rlhf.tracking import open_tracker
        from rlhf.v1 import events_pb2

        s = self.settings
        set_torch_threads(s.reward_torch_threads)
        topics = Topics(s.topic_prefix)
        ensure_topics(
            s.kafka_bootstrap,
            [topics.feedback, Topics.dlq(topics.feedback), topics.reward_updates, topics.feedback_quarantine],
        )
        spec = resolve_backbone(s.reward_backbone, policy_model=s.model)
        base = load_reward_model(
            spec, max_tokens=s.reward_max_tokens, head_seed=s.reward_seed, device=resolve_device(s.reward_device)
        )
        cfg = config_from(s, TrainerConfig, PREFIX)
        reliability = config_from(s, ReliabilityConfig, RELIABILITY_PREFIX)
        self._producer = EventProducer(s.kafka_bootstrap, client_id="reward")

        def make_consumer():
            return EventConsumer(
                s.kafka_bootstrap,
                topics.feedback,
                events_pb2.Feedback,
                s.reward_group_id,
                dlq_producer=self._producer,
                client_id="reward-feedback",
            )

        checkpoints = RewardCheckpoints(
            s.state_dir / "reward", keep_versions=s.reward_keep_versions, versions=s.reward_store_path()
        )
        adopted = checkpoints.adopt(s.state_dir / "reward" / "versions")
        if adopted:
            log.warning(
                "reward versions copied into the reward store (RLHF_REWARD_STORE now points there)",
                extra={"versions": adopted, "store": str(checkpoints.store.root)},
            )
        self.loop = OnlineRewardLoop(
            make_trainer=lambda: OnlineRewardTrainer(base.clone(), cfg, reliability),
            make_consumer=make_consumer,
            producer=self._producer,
            updates_topic=topics.reward_updates,
            checkpoints=checkpoints,
            backbone=spec,
            cfg=config_from(s, LoopConfig, PREFIX),
            on_swap=self.servicer.swap,
            tracker=open_tracker(s.reward_tracking, s.state_dir, "reward"),
            quarantine_topic=topics.feedback_quarantine,
            read_quarantine=lambda rater: read_quarantined(s.kafka_bootstrap, topics.feedback_quarantine, rater),
        )
        self.servicer.loop = self.loop
        self.loop.restore()
        if not self.loop.assigned:
            raise RuntimeError(f"feedback consumer has no partitions of {topics.feedback}")

    def _start_scorer(self) -> None:
        """A version loaded (the store's newest, or version 0) and the announcements assigned: then SERVING."""
        from rlhf.bus import EventConsumer, Topics, ensure_topics
        from rlhf.models import resolve_device, set_torch_threads
        from rlhf.reward import ScoreNormalizer, load_reward_model, resolve_backbone
        from rlhf.reward.follower import RewardFollower
        from rlhf.v1 import events_pb2
        from rlhf.weightstore import WeightStore

        s = self.settings
        set_torch_threads(s.reward_torch_threads)
        topic = Topics(s.topic_prefix).reward_updates
        ensure_topics(s.kafka_bootstrap, [topic])
        spec = resolve_backbone(s.reward_backbone, policy_model=s.model)
        base = load_reward_model(
            spec, max_tokens=s.reward_max_tokens, head_seed=s.reward_seed, device=resolve_device(s.reward_device)
        )
        cfg = config_from(s, TrainerConfig, PREFIX)
        store = WeightStore(s.reward_store_path())
        self.follower = RewardFollower(
            store,
            base,
            lambda: ScoreNormalizer(window=cfg.norm_window, clip=cfg.norm_clip),
            lambda group: EventConsumer(
                s.kafka_bootstrap, topic, events_pb2.RewardModelUpdate, group, client_id="reward-scorer"
            ),
            self.servicer.swap,
            follow_seconds=s.reward_follow_seconds,
        )
        self.follower.start()
        log.info(
            "reward scorer replica",
            extra={"store": str(store.root), "rm_version": self.follower.version, "topic": topic},
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 120)
        await self.servicer.close()
        if self.follower is not None:
            self.follower.close()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
        if self._writer is not None:
            self._writer.release()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(RewardSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reward")
    return run_service(RewardService(settings), settings)
