"""Settings of the reference service (RLHF_<NAME> or --<name>; `rlhf config` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf.serving import GrpcServiceSettings
from rlhf.serving.settings import PolicyModelSettings


class ReferenceSettings(PolicyModelSettings, GrpcServiceSettings):
    port: int = Field(50053, description="gRPC port")
    metrics_port: int = Field(9103, description="Prometheus /metrics HTTP port; 0 disables it")
    reference_max_items: int = Field(256, description="most (prompt, response) items in one LogProbs call")
    reference_max_tokens: int = Field(
        4096, description="most prompt + response tokens in one item (also capped by the model's context)"
    )
    reference_batching: Literal["exact", "padded"] = Field(
        "exact", description="exact: equal-length groups, bitwise equal to one-by-one; padded: one padded forward"
    )
    reference_max_batch_items: int = Field(64, description="items coalesced from concurrent calls into one model call")
    reference_max_batch_tokens: int = Field(8192, description="padded tokens per forward pass")
    reference_max_wait_ms: float = Field(2.0, description="how long a lone call waits for others to batch with")
    reference_device: str = Field("auto", description='"auto" (cuda if present), "cpu" or "cuda[:n]"')
    reference_torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default (all cores)")
