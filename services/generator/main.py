"""Generation service: serves the current policy (vLLM or transformers backend)."""

from __future__ import annotations

import sys
from typing import Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.v1 import generation_pb2_grpc


class GeneratorSettings(GrpcServiceSettings):
    port: int = Field(50051, description="gRPC port")
    metrics_port: int = Field(9101, description="Prometheus /metrics HTTP port; 0 disables it")
    model: str = Field("demo", description='policy weights: "demo" (SmolLM2-135M-Instruct) or a folder')


class GeneratorService(Service):
    name = "generator"
    grpc_services = ("rlhf.v1.GenerationService",)

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        # Every RPC answers UNIMPLEMENTED until the generation issue fills it in.
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation_pb2_grpc.GenerationServiceServicer(), server)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GeneratorSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-generator")
    return run_service(GeneratorService(settings), settings)
