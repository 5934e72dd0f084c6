"""rlhf.v1.LearnerService: the learner's control plane (status, pause/resume, versions, rollback).

Pause, Resume and Rollback need the control token (`authorization: Bearer <RLHF_CONTROL_TOKEN>`;
rlhf/serving/auth.py, checked by the server's interceptor before these handlers run);
GetStatus and ListVersions are open. Refusals are rlhf.errors exceptions (Unavailable while
the learner loads, InvalidArgument, and the NotFound / FailedPrecondition that
`Learner.rollback` raises), answered with their status code by the server.

The service (services/learner/main.py) makes the servicer before the server starts and
hands it the `Learner` once that has loaded its model and checkpoint."""

from __future__ import annotations

import asyncio

from rlhf.errors import InvalidArgument, Unavailable
from rlhf.learner.loop import Learner
from rlhf.v1 import learner_pb2, learner_pb2_grpc


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, learner: Learner | None = None):
        self.learner = learner  # None until the service has started it

    def _learner(self) -> Learner:
        if self.learner is None:
            raise Unavailable("learner is still loading its model and checkpoint")
        return self.learner

    @staticmethod
    def _status(learner: Learner) -> learner_pb2.LearnerStatus:
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
            rollouts_per_version=s["rollouts_per_version"],
            max_policy_lag=s["max_policy_lag"],
            temperature=s["temperature"],
        )

    async def GetStatus(self, request, context):
        return self._status(self._learner())

    async def Pause(self, request, context):
        learner = self._learner()
        await asyncio.to_thread(learner.pause)  # waits for the step in flight, off the event loop
        return self._status(learner)

    async def Resume(self, request, context):
        learner = self._learner()
        learner.resume()
        return self._status(learner)

    async def ListVersions(self, request, context):
        learner = self._learner()
        versions = await asyncio.to_thread(learner.versions)
        return learner_pb2.ListVersionsResponse(versions=versions)

    async def Rollback(self, request: learner_pb2.RollbackRequest, context):
        learner = self._learner()
        if request.version < 0:
            raise InvalidArgument(f"version must be ≥ 0, got {request.version}")
        # runs on the training thread between two steps
        return await asyncio.to_thread(learner.rollback, request.version)
