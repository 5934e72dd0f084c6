"""rlhf.v1.RewardService over gRPC: Score with the serving RM version, GetInfo on its training,
ListRaters / ReleaseRater on rater reliability (ReleaseRater needs the control token: it is
in rlhf.serving.auth.CONTROL_METHODS).

The online loop (rlhf.reward.online) trains and hands each new version over through
`swap` (on_swap) — or, on a scorer replica, the follower (rlhf.reward.follower) that loads
the trainer's versions; concurrent Score calls share one forward pass (rlhf.serving.batcher), and
a batch is scored by one version whole. Refusals are rlhf.errors exceptions, answered with
their status code by the server (rlhf/serving/server.py): Unavailable until the first
version is loaded or while shutting down, InvalidArgument naming the field and the limit.

Imported by the service (services/reward/main.py), not by `rlhf.reward`, which stays free of grpc."""

from __future__ import annotations

import asyncio
from typing import Any

from rlhf.errors import FailedPrecondition, InvalidArgument, Unavailable
from rlhf.reward.data import messages_of
from rlhf.reward.metrics import SCORED
from rlhf.serving.batcher import MicroBatcher, submit_or_raise
from rlhf.v1 import reward_pb2, reward_pb2_grpc


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self,
        *,
        backbone: str,
        max_items: int,
        max_prompt_chars: int,
        max_response_chars: int,
        score_batch_size: int,
        max_wait_ms: float,
        role: str = "trainer",
    ):
        """Limits as the reward service's settings name them (RLHF_REWARD_MAX_ITEMS, ..._PROMPT_CHARS,
        ..._RESPONSE_CHARS); `score_batch_size` items per forward pass, `max_wait_ms` a lone
        call's wait for company."""
        self.backbone = backbone
        self.role = role  # "scorer": Score and GetInfo only (rlhf/reward/follower.py)
        self.max_items, self.max_prompt_chars, self.max_response_chars = max_items, max_prompt_chars, max_response_chars
        self.score_batch_size = score_batch_size
        self.snapshot: Any = None  # rlhf.reward.online.ServingSnapshot, replaced whole on each version
        self.loop: Any = None  # rlhf.reward.online.OnlineRewardLoop, for GetInfo's training numbers
        self.batcher = MicroBatcher(self._score, score_batch_size, max_wait_ms, name="reward")

    def swap(self, snapshot) -> None:
        """The loop's on_swap: one reference assignment, so a batch sees the old or the new version whole."""
        self.snapshot = snapshot

    async def close(self) -> None:
        await self.batcher.close()

    def validate(self, request: reward_pb2.ScoreRequest) -> None:
        """InvalidArgument naming the field and the limit if the request cannot be served."""
        if len(request.items) > self.max_items:
            raise InvalidArgument(f"items: {len(request.items)} items > limit {self.max_items} (RLHF_REWARD_MAX_ITEMS)")
        for i, it in enumerate(request.items):
            n = sum(len(m.content) for m in it.prompt)
            if n > self.max_prompt_chars:
                raise InvalidArgument(
                    f"items[{i}].prompt: {n} characters > limit {self.max_prompt_chars} (RLHF_REWARD_MAX_PROMPT_CHARS)"
                )
            if len(it.response) > self.max_response_chars:
                raise InvalidArgument(
                    f"items[{i}].response: {len(it.response)} characters > limit "
                    f"{self.max_response_chars} (RLHF_REWARD_MAX_RESPONSE_CHARS)"
                )

    def _score(self, items: list[tuple]) -> list[tuple[float, float, int]]:
        """On the batcher's thread: one snapshot (version) for the whole batch."""
        snap = self.snapshot
        raw, norm = snap.score([p for p, _ in items], [r for _, r in items], self.score_batch_size)
        SCORED.inc(len(items))
        return [(float(a), float(b), snap.version) for a, b in zip(raw.tolist(), norm.tolist())]

    async def Score(self, request: reward_pb2.ScoreRequest, context):
        if self.snapshot is None:
            raise Unavailable("reward model is still loading")
        self.validate(request)
        items = [(messages_of(it.prompt), it.response) for it in request.items]
        results = await submit_or_raise(self.batcher, items, "reward", "scoring")
        version = results[0][2] if results else self.snapshot.version
        return reward_pb2.ScoreResponse(
            scores=[n for _, n, _ in results], raw_scores=[r for r, _, _ in results], rm_version=version
        )

    async def GetInfo(self, request: reward_pb2.RewardInfoRequest, context):
        if self.snapshot is not None and self.role == "scorer":  # the numbers the served version was written with
            info = self.snapshot.info
            return reward_pb2.RewardInfo(
                rm_version=self.snapshot.version,
                train_step=self.snapshot.train_step,
                online_accuracy=float(info.get("online_accuracy", 0.0)),
                pairs_seen=int(info.get("pairs_seen", 0)),
                examples_seen=int(info.get("examples_seen", 0)),
                backbone=self.backbone,
            )
        if self.snapshot is None or self.loop is None or self.loop.trainer is None:
            raise Unavailable("reward model is still loading")
        tr = self.loop.trainer
        return reward_pb2.RewardInfo(
            rm_version=self.snapshot.version,
            train_step=tr.step,
            online_accuracy=tr.online_accuracy,
            pairs_seen=tr.pairs_seen,
            examples_seen=tr.examples_seen,
            backbone=self.backbone,
        )

    def _trainer_only(self, what: str) -> None:
        if self.role == "scorer":
            raise FailedPrecondition(
                f"{what}: this reward replica is a scorer (RLHF_REWARD_ROLE=scorer) and keeps no rater state; "
                "ask the reward trainer (the `reward` service)"
            )

    async def ListRaters(self, request: reward_pb2.ListRatersRequest, context):
        self._trainer_only("ListRaters")
        if self.loop is None or self.loop.trainer is None:
            raise Unavailable("reward model is still loading")
        trainer = self.loop.trainer
        rel = trainer.reliability
        # a snapshot on the training thread: the trainer is not thread-safe
        rows = await asyncio.wrap_future(
            self.loop.submit(
                lambda: [
                    reward_pb2.RaterInfo(
                        rater_id=r,
                        accuracy=rel.accuracy.get(r, 0.0),
                        votes=rel.counts.get(r, 0),
                        weight=rel.weight(r),
                        quarantined=r in rel.quarantined,
                        released=r in rel.released,
                        held_examples=len(trainer.held.get(r, [])),
                    )
                    for r in sorted(set(rel.accuracy) | rel.quarantined | set(trainer.held))
                ]
            )
        )
        return reward_pb2.ListRatersResponse(raters=rows, quarantined=sum(r.quarantined for r in rows))

    async def ReleaseRater(self, request: reward_pb2.ReleaseRaterRequest, context):
        self._trainer_only("ReleaseRater")
        rater = request.rater_id.strip()
        if not rater:
            raise InvalidArgument("rater_id: required (as the feedback carries it, e.g. header:alice)")
        if self.loop is None or self.loop.trainer is None:
            raise Unavailable("reward model is still loading")
        rel, held = self.loop.trainer.reliability, self.loop.trainer.held
        if rater not in rel.quarantined and rater not in held:
            raise FailedPrecondition(
                f"rater_id: {rater!r} is not quarantined (`rlhf raters` lists who is); nothing to release"
            )
        out = await asyncio.wrap_future(self.loop.submit(lambda: self.loop.release_rater(rater)))
        return reward_pb2.ReleaseRaterResponse(rater_id=rater, **out)
