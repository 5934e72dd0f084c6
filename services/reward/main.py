"""Reward service: scores (prompt, response) with r_φ and trains it online from feedback."""

from __future__ import annotations

import sys
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.v1 import reward_pb2_grpc


class RewardSettings(GrpcServiceSettings):
    port: int = Field(50052, description="gRPC port")
    metrics_port: int = Field(9102, description="Prometheus /metrics HTTP port; 0 disables it")


class RewardService(Service):
    name = "reward"
    grpc_services = ("rlhf.v1.RewardService",)

    def __init__(self, settings: RewardSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(reward_pb2_grpc.RewardServiceServicer(), server)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(RewardSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reward")
    return run_service(RewardService(settings), settings)
