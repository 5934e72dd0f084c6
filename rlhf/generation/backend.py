"""The interface both generation backends implement (transformers and vLLM)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, AsyncIterator

from rlhf.generation.types import Delta, Sampling, WeightsRefused
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

    # --- a canary's candidate, served beside the stable version (issue 15) ------------

    async def prepare_candidate(self, update: WeightUpdate) -> Any:
        """Ready `update` to be served as the candidate beside the stable version, while
        everything serves on; `WeightsRefused` (one line saying why) if this backend cannot."""
        raise WeightsRefused(f"the {self.name} backend serves one version at a time: no canary candidate")

    async def activate_candidate(self, prepared: Any) -> Any:
        """Make the prepared candidate leasable without draining the stable version's
        requests; returns its lease handle."""
        raise NotImplementedError

    async def drop_candidate(self, handle: Any) -> None:
        """Free a candidate nobody leases any more (the generator waited for its requests)."""

    def promote_drains(self) -> bool:
        """Whether making the candidate the stable version changes weights in place."""
        return True

    async def promote_candidate(self, handle: Any) -> Any:
        """Make the candidate (`handle`) the stable version; returns the stable lease handle.
        Called with no request in flight when `promote_drains()` said so."""
        raise NotImplementedError
