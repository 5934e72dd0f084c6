"""Reference service: log-probs under the frozen reference policy π_ref."""

from __future__ import annotations

import sys
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.v1 import reference_pb2_grpc


class ReferenceSettings(GrpcServiceSettings):
    port: int = Field(50053, description="gRPC port")
    metrics_port: int = Field(9103, description="Prometheus /metrics HTTP port; 0 disables it")
    model: str = Field("demo", description='reference weights: "demo" (SmolLM2-135M-Instruct) or a folder')


class ReferenceService(Service):
    name = "reference"
    grpc_services = ("rlhf.v1.ReferenceService",)

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(reference_pb2_grpc.ReferenceServiceServicer(), server)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(ReferenceSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reference")
    return run_service(ReferenceService(settings), settings)
