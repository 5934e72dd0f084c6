"""Settings of the generation service (RLHF_<NAME> or --<name>; `rlhf config` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf.serving import GrpcServiceSettings
from rlhf.serving.settings import PolicyModelSettings, WeightStoreSettings


class GeneratorSettings(PolicyModelSettings, WeightStoreSettings, GrpcServiceSettings):
    port: int = Field(50051, description="gRPC port")
    metrics_port: int = Field(9101, description="Prometheus /metrics HTTP port; 0 disables it")
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
    follow_policy_updates: bool = Field(True, description="load PROMOTED / ROLLED_BACK versions announced on Kafka")
    enable_lora: bool = Field(True, description="accept LoRA adapter versions (vLLM: reserves LoRA slots)")
    max_lora_rank: int = Field(16, description="largest LoRA rank accepted")
    batch_wait_ms: float = Field(
        5.0, description="transformers backend: an idle engine waits this long to batch requests sent together"
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="transformers backend: continuous = requests join the running batch between decode steps; "
        "static = a batch runs to its end before the next starts",
    )
    prefill_token_budget: int = Field(
        512,
        ge=1,
        description="transformers backend, continuous batching: most prompt tokens prefilled per decode step "
        "(a longer prompt joins alone)",
    )
    preemption: Literal["on", "off"] = Field(
        "on",
        description="transformers backend, continuous batching: on = rollout rows (priority >= 10) are parked, "
        "KV kept, while chats decode or wait, and rejoin when none are left; off = they decode side by side",
    )
    preempt_max_wait_seconds: float = Field(
        30.0,
        ge=0,
        description="transformers backend, pre-emption: most seconds a rollout row spends parked in all, "
        "or a rollout request waits in the queue while chats run; then it decodes beside the chats and is "
        "not parked again (keep it well under the rollout worker's "
        "rollout_generate_timeout_seconds)",
    )
    candidate_memory_margin_gib: float = Field(
        1.0,
        ge=0,
        description="transformers backend, canary: a full-weight candidate (a second model copy) is loaded only "
        "when free memory covers its weights plus this many GiB; otherwise it is refused naming both",
    )
    candidate_memory_limit_gib: float = Field(
        0.0,
        ge=0,
        description="transformers backend, canary: GiB a full-weight candidate may count as free (0: the device's "
        "free memory as psutil / CUDA report it; set it in a container whose limit psutil does not see)",
    )
    torch_threads: int = Field(0, description="transformers backend: torch intra-op threads; 0 keeps torch's default")
    vllm_enforce_eager: bool = Field(True, description="vLLM: skip graph capture / torch.compile (slow start on CPU)")
    vllm_kv_cache_gib: float = Field(1.0, description="vLLM on CPU: GiB reserved for the KV cache")
