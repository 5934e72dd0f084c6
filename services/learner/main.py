"""PPO learner service: consumes rollouts, trains, gates and publishes policy versions."""

from __future__ import annotations

import sys
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.v1 import learner_pb2_grpc


class LearnerSettings(GrpcServiceSettings):
    port: int = Field(50054, description="gRPC port")
    metrics_port: int = Field(9104, description="Prometheus /metrics HTTP port; 0 disables it")
    model: str = Field("demo", description='initial policy: "demo" (SmolLM2-135M-Instruct) or a folder')


class LearnerService(Service):
    name = "learner"
    grpc_services = ("rlhf.v1.LearnerService",)

    def __init__(self, settings: LearnerSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(learner_pb2_grpc.LearnerServiceServicer(), server)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(LearnerSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-learner")
    return run_service(LearnerService(settings), settings)
