"""The interface both generation backends implement (transformers and vLLM)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, AsyncIterator

from rlhf.generation.types import Delta, Sampling
from rlhf.generation.weights import WeightUpdate


class Backend(ABC):
    #: "transformers" or "vllm"
    name: str
    #: whether `Sampling.json_object` / `json_schema` are honoured (constrained decoding)
    structured_outputs: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Load the base model; after this `generate` works."""

    async def stop(self) -> None:
        """Release the engine (processes, threads)."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        handle: Any,
        stream: bool = True,
    ) -> AsyncIterator[Delta]:
        """Deltas of all `sampling.n` samples, interleaved; each sample ends with a delta that
        has `finish_reason` set (with `stream=False`, that is its only delta: less work per
        token for callers that wait for the whole answer). `handle` is `Served.handle` of the
        caller's lease. Closing the iterator early cancels the request."""

    @abstractmethod
    def drains(self, update: WeightUpdate) -> bool:
        """Whether serving `update` must wait for in-flight requests (weights changed in place)
        or can start at once for new requests (weights chosen per request)."""

    @abstractmethod
    async def prepare(self, update: WeightUpdate) -> Any:
        """Everything that can happen while the old version still serves (read files,
        pre-load an adapter). Raises `WeightsRefused` if the engine rejects the update."""

    async def discard(self, prepared: Any) -> None:
        """Drop a prepared update that will not be activated (its sha256 did not match)."""

    @abstractmethod
    async def activate(self, prepared: Any) -> Any:
        """Make the prepared update what new requests use; returns the lease handle. Called
        with no request in flight when `drains()` said so."""
