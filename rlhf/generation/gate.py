"""Which weights a request runs under, and swapping them without failing a request.

A generator serves a *stable* version and, during a canary (issue 15), one *candidate*
beside it. Every request takes a *lease* on one of them when it starts (the stable one
unless it names the candidate by number) and keeps it to its last token, so the version a
response reports is the one that produced all of it. A *draining* swap (new full weights
written in place) holds new leases back, waits for the open ones to end, swaps, and lets the
held requests through: atomic between requests. A backend that picks weights per request
(a vLLM LoRA adapter, the transformers backend's per-row candidate adapter) swaps without
draining: new leases simply get the new version while old ones finish on theirs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from rlhf.errors import FailedPrecondition


class NotServed(FailedPrecondition):
    """A request names a policy version this generator does not serve now (FAILED_PRECONDITION:
    the message names the versions it does serve)."""


@dataclass(frozen=True)
class Served:
    """What new requests run under."""

    version: int
    fmt: str  # "full" or "lora"
    handle: Any = None  # backend-specific, e.g. the vLLM LoRARequest of the adapter


class VersionGate:
    def __init__(self, current: Served):
        self._current = current
        self._candidate: Served | None = None
        self.canary_share = 0.0  # share of new conversations the gateway sends the candidate
        self._active = 0
        self._by_version: Counter[int] = Counter()  # open leases per version
        self._draining = False
        self._cond = asyncio.Condition()

    @property
    def current(self) -> Served:
        """The stable version: what requests that name no version run under."""
        return self._current

    @property
    def candidate(self) -> Served | None:
        """The canary's candidate, served beside the stable version (None: no canary)."""
        return self._candidate

    @property
    def active(self) -> int:
        """Requests holding a lease now."""
        return self._active

    def describe(self) -> str:
        """The versions served, for error messages: "stable v3 and candidate v5"."""
        text = f"stable v{self._current.version}"
        if self._candidate is not None:
            text += f" and candidate v{self._candidate.version}"
        return text

    def pick(self, version: int = 0) -> Served:
        """The slot a request for `version` runs under: 0 = the stable one, else the stable
        or the candidate by number; any other version is `NotServed`."""
        if version == 0 or version == self._current.version:
            return self._current
        if self._candidate is not None and version == self._candidate.version:
            return self._candidate
        raise NotServed(
            f"policy_version: version {version} is not served by this generator; it serves "
            f"{self.describe()} (0 = the stable version)"
        )

    @asynccontextmanager
    async def lease(self, version: int = 0) -> AsyncIterator[Served]:
        """Hold the slot for `version` (see `pick`) until the block ends."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._draining)
            served = self.pick(version)
            self._active += 1
            self._by_version[served.version] += 1
        try:
            yield served
        finally:
            async with self._cond:
                self._active -= 1
                self._by_version[served.version] -= 1
                self._cond.notify_all()

    async def idle(self, version: int) -> None:
        """Wait until no lease on `version` is open (to free an adapter nobody may lease any more)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._by_version[version] <= 0)

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """No request runs inside this block; requests arriving meanwhile wait for its end."""
        async with self._cond:
            self._draining = True
            try:
                await self._cond.wait_for(lambda: self._active == 0)
            except BaseException:
                self._draining = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._draining = False
                self._cond.notify_all()

    def set(self, served: Served) -> None:
        """New leases of the stable version get `served` from now on (call inside `drained()`
        unless the backend selects weights per request)."""
        self._current = served

    def set_candidate(self, served: Served | None) -> None:
        """New leases naming the candidate get `served` (None: no candidate any more; leases
        already open keep theirs to their end)."""
        self._candidate = served
