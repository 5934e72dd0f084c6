"""What `rlhf status` asks each service besides its health: the version it serves."""

from __future__ import annotations

import grpc

from rlhf.launcher import ServiceSpec
from rlhf.serving.client import sync_channel


def service_version(spec: ServiceSpec, timeout: float = 2.0) -> str:
    from rlhf.v1 import generation_pb2, generation_pb2_grpc, learner_pb2, learner_pb2_grpc, reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc

    calls = {
        "generator": lambda ch: f"policy v{generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(generation_pb2.GetInfoRequest(), timeout=timeout).policy_version}",
        "reward": lambda ch: f"rm v{reward_pb2_grpc.RewardServiceStub(ch).GetInfo(reward_pb2.RewardInfoRequest(), timeout=timeout).rm_version}",
        "reference": lambda ch: reference_pb2_grpc.ReferenceServiceStub(ch).GetInfo(reference_pb2.ReferenceInfoRequest(), timeout=timeout).model,
        "learner": lambda ch: f"policy v{learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(learner_pb2.GetStatusRequest(), timeout=timeout).policy_version}",
    }
    if spec.name not in calls:
        return "-"
    with sync_channel(spec.address) as ch:
        try:
            return calls[spec.name](ch)
        except grpc.RpcError as e:
            return f"({e.code().name.lower()})"
