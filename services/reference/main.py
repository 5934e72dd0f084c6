"""Reference service: log-probs under the frozen reference policy π_ref."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Literal, Sequence

import grpc
from pydantic import Field

from rlhf.serving import GrpcServiceSettings, Service, load_settings, run_service
from rlhf.serving.batcher import MicroBatcher, submit_or_abort
from rlhf.v1 import common_pb2, reference_pb2, reference_pb2_grpc

log = logging.getLogger(__name__)


class ReferenceSettings(GrpcServiceSettings):
    port: int = Field(50053, description="gRPC port")
    metrics_port: int = Field(9103, description="Prometheus /metrics HTTP port; 0 disables it")
    model: str = Field("demo", description='reference weights: "demo" (SmolLM2-135M-Instruct) or a folder')
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


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, service: "ReferenceService"):
        self.service = service

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context: grpc.aio.ServicerContext):
        svc = self.service
        if svc.model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "reference model is still loading")
        problem = svc.validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        items = [(list(it.prompt_token_ids), list(it.response_token_ids)) for it in request.items]
        results = await submit_or_abort(svc.batcher, items, context, "reference", "log-probs")
        return reference_pb2.LogProbsResponse(
            results=[common_pb2.TokenLogProbs(logprobs=lp) for lp in results], model=svc.model_name
        )

    async def GetInfo(self, request: reference_pb2.ReferenceInfoRequest, context: grpc.aio.ServicerContext):
        svc = self.service
        if svc.model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "reference model is still loading")
        return reference_pb2.ReferenceInfo(model=svc.model_name, max_model_len=svc.max_tokens)


class ReferenceService(Service):
    name = "reference"
    grpc_services = ("rlhf.v1.ReferenceService",)

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        self.model = None
        self.model_name = ""
        self.max_tokens = settings.reference_max_tokens
        self.batcher = MicroBatcher(self._forward, settings.reference_max_batch_items,
                                    settings.reference_max_wait_ms, name="reference")

    def register(self, server: grpc.aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(ReferenceServicer(self), server)

    async def start(self) -> None:
        from rlhf.models import resolve_model
        from rlhf.reference import ReferenceModel
        from rlhf.reward.model import resolve_device

        s = self.settings
        if s.reference_torch_threads > 0:
            import torch

            torch.set_num_threads(s.reference_torch_threads)
        path = await asyncio.to_thread(resolve_model, s.model)
        model = await asyncio.to_thread(ReferenceModel, path, s.reference_batching, s.reference_max_batch_tokens,
                                        resolve_device(s.reference_device))
        if model.max_model_len:
            self.max_tokens = min(self.max_tokens, model.max_model_len)
        self.model_name = s.model if s.model == "demo" else str(path)
        self.model = model
        log.info("reference model loaded", extra={"model": str(path), "max_tokens": self.max_tokens,
                                                  "batching": s.reference_batching, "device": str(model.device)})

    async def stop(self) -> None:
        await self.batcher.close()

    def validate(self, request: reference_pb2.LogProbsRequest) -> str:
        """Why the request cannot be served, naming the field and the limit; "" if it can."""
        s = self.settings
        if len(request.items) > s.reference_max_items:
            return f"items: {len(request.items)} items > limit {s.reference_max_items} (RLHF_REFERENCE_MAX_ITEMS)"
        vocab = self.model.vocab_size
        for i, it in enumerate(request.items):
            if not it.prompt_token_ids:
                return f"items[{i}].prompt_token_ids: empty; the first response token needs a context"
            n = len(it.prompt_token_ids) + len(it.response_token_ids)
            if n > self.max_tokens:
                return (f"items[{i}]: prompt_token_ids + response_token_ids = {n} tokens > limit "
                        f"{self.max_tokens} (RLHF_REFERENCE_MAX_TOKENS / model context)")
            for field in ("prompt_token_ids", "response_token_ids"):
                ids = getattr(it, field)
                if ids and (min(ids) < 0 or max(ids) >= vocab):
                    return f"items[{i}].{field}: token ids must be in [0, {vocab})"
        return ""

    def _forward(self, items: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        lps = self.model.logprobs([p for p, _ in items], [r for _, r in items])
        return [lp.tolist() for lp in lps]


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(ReferenceSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reference")
    return run_service(ReferenceService(settings), settings)
