"""rlhf.v1.LearnerService: the learner's control plane (status, pause/resume, versions, rollback)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from rlhf.v1 import learner_pb2, learner_pb2_grpc

if TYPE_CHECKING:
    from services.learner.main import LearnerService


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, service: LearnerService):
        self.service = service

    async def _learner(self, context: grpc.aio.ServicerContext):
        learner = self.service.learner
        if learner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "learner is still loading its model and checkpoint")
        return learner

    async def _status(self, learner) -> learner_pb2.LearnerStatus:
        s = learner.status()
        return learner_pb2.LearnerStatus(
            paused=s["paused"],
            step=s["step"],
            policy_version=s["policy_version"],
            serving_version=s["serving_version"],
            kl_coef=s["kl_coef"],
            rollouts_trained=s["rollouts_trained"],
            rollouts_dropped_stale=s["rollouts_dropped_stale"],
            last_stats=s["last_stats"],
        )

    async def GetStatus(self, request, context):
        return await self._status(await self._learner(context))

    async def Pause(self, request, context):
        learner = await self._learner(context)
        learner.pause()
        return await self._status(learner)

    async def Resume(self, request, context):
        learner = await self._learner(context)
        learner.resume()
        return await self._status(learner)

    async def ListVersions(self, request, context):
        learner = await self._learner(context)
        versions = await asyncio.to_thread(learner.versions)
        return learner_pb2.ListVersionsResponse(versions=versions)

    async def Rollback(self, request: learner_pb2.RollbackRequest, context):
        from rlhf.learner import LearnerError

        learner = await self._learner(context)
        if request.version < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version must be ≥ 0, got {request.version}")
        try:
            # runs on the training thread between two steps
            return await asyncio.to_thread(learner.rollback, request.version)
        except LearnerError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
