"""rlhf.v1.ReferenceService over gRPC: LogProbs under the frozen π_ref, GetInfo.

Concurrent LogProbs calls share one model call (rlhf.serving.batcher). Refusals are
rlhf.errors exceptions, answered with their status code by the server
(rlhf/serving/server.py): Unavailable until the model is loaded or while shutting down,
InvalidArgument naming the field and the limit.

Imported by the service (services/reference/main.py), not by `rlhf.reference`, which loads no grpc."""

from __future__ import annotations

from typing import Any

from rlhf.errors import InvalidArgument, Unavailable
from rlhf.serving.batcher import MicroBatcher, submit_or_raise
from rlhf.v1 import common_pb2, reference_pb2, reference_pb2_grpc


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, *, max_items: int, max_tokens: int, max_batch_items: int, max_wait_ms: float):
        """Limits as the reference service's settings name them (RLHF_REFERENCE_MAX_ITEMS,
        RLHF_REFERENCE_MAX_TOKENS); `max_batch_items` coalesced into one model call,
        `max_wait_ms` a lone call's wait for company."""
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.model: Any = None  # rlhf.reference.ReferenceModel once loaded
        self.model_name = ""
        self.batcher = MicroBatcher(self._forward, max_batch_items, max_wait_ms, name="reference")

    def serve(self, model, name: str) -> None:
        """Start answering with `model` (a ReferenceModel), reported as `name`; the token
        limit shrinks to the model's context if that is shorter."""
        if model.max_model_len:
            self.max_tokens = min(self.max_tokens, model.max_model_len)
        self.model_name = name
        self.model = model  # last: a call that sees the model sees its name and limit

    async def close(self) -> None:
        await self.batcher.close()

    def validate(self, request: reference_pb2.LogProbsRequest) -> None:
        """InvalidArgument naming the field and the limit if the request cannot be served."""
        if len(request.items) > self.max_items:
            raise InvalidArgument(
                f"items: {len(request.items)} items > limit {self.max_items} (RLHF_REFERENCE_MAX_ITEMS)"
            )
        vocab = self.model.vocab_size
        for i, it in enumerate(request.items):
            if not it.prompt_token_ids:
                raise InvalidArgument(f"items[{i}].prompt_token_ids: empty; the first response token needs a context")
            n = len(it.prompt_token_ids) + len(it.response_token_ids)
            if n > self.max_tokens:
                raise InvalidArgument(
                    f"items[{i}]: prompt_token_ids + response_token_ids = {n} tokens > limit "
                    f"{self.max_tokens} (RLHF_REFERENCE_MAX_TOKENS / model context)"
                )
            for field in ("prompt_token_ids", "response_token_ids"):
                ids = getattr(it, field)
                if ids and (min(ids) < 0 or max(ids) >= vocab):
                    raise InvalidArgument(f"items[{i}].{field}: token ids must be in [0, {vocab})")

    def _forward(self, items: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        lps = self.model.logprobs([p for p, _ in items], [r for _, r in items])
        return [lp.tolist() for lp in lps]

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context):
        if self.model is None:
            raise Unavailable("reference model is still loading")
        self.validate(request)
        items = [(list(it.prompt_token_ids), list(it.response_token_ids)) for it in request.items]
        results = await submit_or_raise(self.batcher, items, "reference", "log-probs")
        return reference_pb2.LogProbsResponse(
            results=[common_pb2.TokenLogProbs(logprobs=lp) for lp in results], model=self.model_name
        )

    async def GetInfo(self, request: reference_pb2.ReferenceInfoRequest, context):
        if self.model is None:
            raise Unavailable("reference model is still loading")
        return reference_pb2.ReferenceInfo(model=self.model_name, max_model_len=self.max_tokens)
