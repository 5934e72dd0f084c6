"""Generation service: serves the current policy (vLLM or transformers backend)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Sequence

import grpc

from rlhf.generation import Generator, Limits, make_backend
from rlhf.generation.follower import PolicyFollower
from rlhf.generation.servicer import GenerationServicer
from rlhf.serving import Service, load_settings, run_service
from rlhf.v1 import generation_pb2_grpc
from services.generator.settings import GeneratorSettings


class GeneratorService(Service):
    name = "generator"
    grpc_services = ("rlhf.v1.GenerationService",)

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings
        self.follower: PolicyFollower | None = None
        self._follow_task: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> None:
        from rlhf.models import resolve_model, set_torch_threads

        s = self.settings
        set_torch_threads(s.torch_threads)
        model_dir = resolve_model(s.model)
        backend = make_backend(
            s.backend,
            model_dir,
            max_model_len=s.max_model_len,
            max_batch=s.max_batch,
            device=s.device,
            dtype=s.dtype,
            enable_lora=s.enable_lora,
            max_lora_rank=s.max_lora_rank,
            vllm_enforce_eager=s.vllm_enforce_eager,
            vllm_kv_cache_gib=s.vllm_kv_cache_gib,
            batch_wait_ms=s.batch_wait_ms,
            batching=s.batching,
            prefill_token_budget=s.prefill_token_budget,
            preemption=s.preemption == "on",
            preempt_max_wait_seconds=s.preempt_max_wait_seconds,
            candidate_memory_margin_gib=s.candidate_memory_margin_gib,
            candidate_memory_limit_gib=s.candidate_memory_limit_gib,
        )
        limits = Limits(
            max_model_len=s.max_model_len,
            default_max_tokens=s.default_max_tokens,
            max_max_tokens=s.max_max_tokens,
            max_n=min(s.max_n, s.max_batch),
        )
        self.generator = Generator(
            backend,
            model_dir,
            limits,
            weight_store=s.weight_store_path(),
            work_dir=s.state_dir / "generator",
            max_lora_rank=s.max_lora_rank if s.enable_lora else 0,
            model_name=s.model,
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.generator, backend.name), server
        )

    async def start(self) -> None:
        await self.generator.start()
        if self.settings.follow_policy_updates:
            from rlhf.bus import Topics

            self.follower = PolicyFollower(
                self.generator, self.settings.kafka_bootstrap, Topics(self.settings.topic_prefix).policy_updates
            )
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
