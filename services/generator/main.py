"""Generation service: serves the current policy (vLLM or transformers backend)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Literal, Sequence

import grpc
from pydantic import Field

from rlhf.generation import Generator, Limits, make_backend
from rlhf.generation.follower import PolicyFollower
from rlhf.generation.servicer import GenerationServicer
from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.v1 import generation_pb2_grpc


class GeneratorSettings(GrpcServiceSettings):
    port: int = Field(50051, description="gRPC port")
    metrics_port: int = Field(9101, description="Prometheus /metrics HTTP port; 0 disables it")
    model: str = Field("demo", description='policy weights: "demo" (SmolLM2-135M-Instruct) or a folder')
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="engine: auto = vllm on a GPU, transformers on CPU (faster there, docs/generation.md)"
    )
    device: str = Field("auto", description='transformers backend device: "auto", "cpu" or "cuda"')
    dtype: str = Field("float32", description="weights dtype: float32, bfloat16 or float16 (vllm also: auto)")
    max_model_len: int = Field(2048, description="context limit: prompt + generated tokens")
    default_max_tokens: int = Field(128, description="max_tokens when a request leaves it 0")
    max_max_tokens: int = Field(1024, description="largest max_tokens a request may ask for")
    max_n: int = Field(16, description="most samples per request")
    max_batch: int = Field(32, description="most sequences decoded together (vLLM max_num_seqs)")
    weight_store: Path | None = Field(None, description="weight-store folder; default <state_dir>/weights")
    follow_policy_updates: bool = Field(True, description="load PROMOTED / ROLLED_BACK versions announced on Kafka")
    enable_lora: bool = Field(True, description="accept LoRA adapter versions (vLLM: reserves LoRA slots)")
    max_lora_rank: int = Field(16, description="largest LoRA rank accepted")
    batch_wait_ms: float = Field(5.0, description="transformers backend: an idle engine waits this long to batch requests sent together")
    torch_threads: int = Field(0, description="transformers backend: torch intra-op threads; 0 keeps torch's default")
    vllm_enforce_eager: bool = Field(True, description="vLLM: skip graph capture / torch.compile (slow start on CPU)")
    vllm_kv_cache_gib: float = Field(1.0, description="vLLM on CPU: GiB reserved for the KV cache")


class GeneratorService(Service):
    name = "generator"
    grpc_services = ("rlhf.v1.GenerationService",)

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings
        self.follower: PolicyFollower | None = None
        self._follow_task: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> None:
        from rlhf.models import resolve_model

        s = self.settings
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        model_dir = resolve_model(s.model)
        backend = make_backend(
            s.backend, model_dir, max_model_len=s.max_model_len, max_batch=s.max_batch, device=s.device, dtype=s.dtype,
            enable_lora=s.enable_lora, max_lora_rank=s.max_lora_rank, vllm_enforce_eager=s.vllm_enforce_eager,
            vllm_kv_cache_gib=s.vllm_kv_cache_gib, batch_wait_ms=s.batch_wait_ms,
        )
        limits = Limits(max_model_len=s.max_model_len, default_max_tokens=s.default_max_tokens,
                        max_max_tokens=s.max_max_tokens, max_n=min(s.max_n, s.max_batch))
        self.generator = Generator(
            backend, model_dir, limits, weight_store=s.weight_store or s.state_dir / "weights",
            work_dir=s.state_dir / "generator", max_lora_rank=s.max_lora_rank if s.enable_lora else 0,
            model_name=s.model,
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self.generator, backend.name), server)

    async def start(self) -> None:
        await self.generator.start()
        if self.settings.follow_policy_updates:
            from rlhf.bus import Topics

            self.follower = PolicyFollower(self.generator, self.settings.kafka_bootstrap,
                                           Topics(self.settings.topic_prefix).policy_updates)
            await self.follower.catch_up()
            self._follow_task = asyncio.create_task(self.follower.run(), name="policy-follower")

    async def stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
        if self.follower is not None:
            self.follower.close()
        await self.generator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GeneratorSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-generator")
    return run_service(GeneratorService(settings), settings)
