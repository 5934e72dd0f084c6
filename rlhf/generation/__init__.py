"""Generation: one interface over the transformers and vLLM engines, per-token log-probs,
and weight swaps that never fail an in-flight request (see docs/generation.md).

Importing this package loads neither gRPC nor Kafka: the servicer (`rlhf.generation.servicer`)
and the PolicyUpdate follower (`rlhf.generation.follower`) are imported by the service."""

from __future__ import annotations

from pathlib import Path

from rlhf.generation.backend import Backend
from rlhf.generation.gate import Served, VersionGate
from rlhf.generation.generator import Generator
from rlhf.generation.params import Limits
from rlhf.generation.types import Delta, InvalidRequest, SampleOut, Sampling, WeightsRefused

# On CPU the transformers backend out-ran vLLM in benchmarks/generation.py (docs/generation.md).
CPU_DEFAULT_BACKEND = "transformers"


def default_backend() -> str:
    import torch

    return "vllm" if torch.cuda.is_available() else CPU_DEFAULT_BACKEND


def make_backend(
    name: str,
    model_dir: Path,
    *,
    max_model_len: int = 2048,
    max_batch: int = 32,
    device: str = "auto",
    dtype: str = "float32",
    enable_lora: bool = True,
    max_lora_rank: int = 16,
    vllm_enforce_eager: bool = True,
    vllm_kv_cache_gib: float = 1.0,
    batch_wait_ms: float = 5.0,
    batching: str = "continuous",
    prefill_token_budget: int = 512,
    preemption: bool = True,
    preempt_max_wait_seconds: float = 30.0,
    candidate_memory_margin_gib: float = 1.0,
    candidate_memory_limit_gib: float = 0.0,
) -> Backend:
    """The backend `name` ("auto", "transformers" or "vllm"); nothing is loaded until `start()`."""
    name = default_backend() if name == "auto" else name
    if name == "vllm":
        from rlhf.generation.vllm_backend import VllmBackend

        return VllmBackend(
            model_dir,
            max_model_len=max_model_len,
            max_batch=max_batch,
            dtype=dtype,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            enforce_eager=vllm_enforce_eager,
            kv_cache_gib=vllm_kv_cache_gib,
        )
    if name == "transformers":
        from rlhf.generation.hf_backend import TransformersBackend

        return TransformersBackend(
            model_dir,
            max_batch=max_batch,
            device=device,
            dtype=dtype,
            batch_wait_ms=batch_wait_ms,
            batching=batching,
            prefill_token_budget=prefill_token_budget,
            preemption=preemption,
            preempt_max_wait_seconds=preempt_max_wait_seconds,
            candidate_memory_margin_gib=candidate_memory_margin_gib,
            candidate_memory_limit_gib=candidate_memory_limit_gib,
        )
    raise ValueError(f"backend must be auto, transformers or vllm, got {name!r}")


__all__ = [
    "Backend",
    "CPU_DEFAULT_BACKEND",
    "Delta",
    "Generator",
    "InvalidRequest",
    "Limits",
    "Sampling",
    "SampleOut",
    "Served",
    "VersionGate",
    "WeightsRefused",
    "default_backend",
    "make_backend",
]
