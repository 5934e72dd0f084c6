"""Which weights a request runs under, and swapping them without failing a request.

Every request takes a *lease* on the version current when it starts and keeps it to its
last token, so the version a response reports is the one that produced all of it. A
*draining* swap (new full weights written in place) holds new leases back, waits for the
open ones to end, swaps, and lets the held requests through: atomic between requests.
A backend that picks weights per request (a vLLM LoRA adapter) swaps without draining:
new leases simply get the new version while old ones finish on theirs.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator


@dataclass(frozen=True)
class Served:
    """What new requests run under."""

    version: int
    fmt: str  # "full" or "lora"
    handle: Any = None  # backend-specific, e.g. the vLLM LoRARequest of the adapter


class VersionGate:
    def __init__(self, current: Served):
        self._current = current
        self._active = 0
        self._draining = False
        self._cond = asyncio.Condition()

    @property
    def current(self) -> Served:
        return self._current

    @property
    def active(self) -> int:
        """Requests holding a lease now."""
        return self._active

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Served]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._draining)
            self._active += 1
            served = self._current
        try:
            yield served
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

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
        """New leases get `served` from now on (call inside `drained()` unless the backend
        selects weights per request)."""
        self._current = served
