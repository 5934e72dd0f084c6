"""rlhf.v1.LearnerService: the learner's control plane (status, pause/resume, versions, rollback,
and the canary's Promote, SetCanary and GetCanary, rlhf/learner/canary.py).

Pause, Resume, Rollback, Promote and SetCanary need the control token (`authorization: Bearer <RLHF_CONTROL_TOKEN>`;
rlhf/serving/auth.py, checked by the server's interceptor before these handlers run);
GetStatus, ListVersions and GetCanary are open. Refusals are rlhf.errors exceptions (Unavailable while
the learner loads, InvalidArgument, and the NotFound / FailedPrecondition that
`Learner.rollback` raises), answered with their status code by the server.

The service (services/learner/main.py) makes the servicer before the server starts and
hands it the `Learner` once that has loaded its model and checkpoint."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

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

    @staticmethod
    def _canary(s: dict[str, Any]) -> learner_pb2.CanaryStatus:
        return learner_pb2.CanaryStatus(
            enabled=s["enabled"],
            stable_version=s["stable_version"],
            candidate_version=s["candidate_version"],
            share=s["share"],
            queued=s["queued"],
            evidence_json=json.dumps(s["evidence"], sort_keys=True) if s["evidence"] is not None else "",
            last_decision_json=json.dumps(s["last_decision"], sort_keys=True, default=str)
            if s["last_decision"] is not None
            else "",
        )

    async def GetCanary(self, request, context):
        return self._canary(self._learner().canary_status())

    async def Promote(self, request: learner_pb2.PromoteRequest, context):
        learner = self._learner()
        if request.version <= 0:
            raise InvalidArgument(f"version must be ≥ 1 (version 0 is the initial policy), got {request.version}")
        return self._canary(await asyncio.to_thread(learner.promote, request.version))

    async def SetCanary(self, request: learner_pb2.SetCanaryRequest, context):
        learner = self._learner()
        if not (request.set_share or request.set_enabled):
            raise InvalidArgument("set_share or set_enabled: nothing to set (both are false)")
        if request.set_share and not (math.isfinite(request.share) and 0.0 <= request.share <= 1.0):
            raise InvalidArgument(f"share: {request.share} is outside [0, 1]")
        share = request.share if request.set_share else None
        enabled = request.enabled if request.set_enabled else None
        return self._canary(await asyncio.to_thread(learner.set_canary, share, enabled))
