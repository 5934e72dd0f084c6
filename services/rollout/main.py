"""Rollout worker: prompts → Generate(n) → Score → LogProbs → Kafka rlhf.rollouts.

It serves no RPC of its own, only the standard health service and metrics, so that
orchestrators probe it the same way as every other service.
"""

from __future__ import annotations

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


class RolloutWorker(Service):
    name = "rollout"
    grpc_services = ()

    def __init__(self, settings: RolloutSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(RolloutSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-rollout")
    return run_service(RolloutWorker(settings), settings)
