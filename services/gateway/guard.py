"""Who may call /v1 and how much: API keys (or a hook), per-key rate limits, body size.

Runs as ASGI middleware, so a refused request costs no body read and no routing.

Auth hook: set `auth_hook="mypkg.auth:check"` to replace the static key list with

    def check(api_key: str | None, headers: Mapping[str, str]) -> str | None:
        '''The caller's principal (rate-limit bucket), or None to answer 401.'''

`api_key` is the bearer token of `Authorization: Bearer <key>` (what OpenAI clients
send) or of `X-API-Key`. The principal never becomes a metric label.
"""

from __future__ import annotations

import hmac
import importlib
import json
import math
import time
from typing import Callable, Mapping

import limits
import limits.storage
import limits.strategies
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.errors import ApiError, error_body

Authenticate = Callable[[str | None, Mapping[str, str]], str | None]


def static_keys(keys: list[str]) -> Authenticate:
    encoded = [k.encode() for k in keys]

    def check(api_key: str | None, headers: Mapping[str, str]) -> str | None:
        if api_key is None:
            return None
        given = api_key.encode()
        # compare with every key, in constant time, so timing reveals nothing
        matches = [hmac.compare_digest(given, k) for k in encoded]
        return f"key{matches.index(True)}" if any(matches) else None

    return check


def load_hook(spec: str) -> Authenticate:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f'auth_hook must look like "package.module:function", not {spec!r}')
    return getattr(importlib.import_module(module), name)


class RateLimiter:
    """Per-principal limit: at most `burst` requests in any `burst / rate` seconds (whole
    seconds; at least `rate` per second), counted by `limits`' sliding-window-counter
    strategy over its in-process MemoryStorage.

    Same long-run rate and burst as a token bucket of `rate`/s holding `burst`; memory is
    two counters per principal, dropped by the storage two windows after its last request,
    so it is bounded by the principals seen in the last two windows (a token bucket that
    has refilled is forgotten the same way). Measured with 100k principals: about 31 MiB
    here, against about 190 MiB for `limits`' moving window at burst 20 (it keeps one entry
    per request)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self.window_s = max(1, math.ceil(self.burst / rate))
        self.amount = max(self.burst, round(rate * self.window_s))
        self.item = limits.RateLimitItemPerSecond(self.amount, self.window_s, namespace="gateway")
        self.storage = limits.storage.MemoryStorage()
        self._limiter = limits.strategies.SlidingWindowCounterRateLimiter(self.storage)

    def acquire(self, principal: str) -> float:
        """0 if the request may go ahead, else the seconds until it may (> 0)."""
        if self._limiter.hit(self.item, principal):
            return 0.0
        reset_at, _ = self._limiter.get_window_stats(self.item, principal)
        return max(reset_at - time.time(), 1e-3)

    def describe(self) -> str:
        return (
            f"{self.rate:g} requests/s ({self.amount} requests per {self.window_s}s, "
            f"rate_limit_rps={self.rate:g}, rate_limit_burst={self.burst})"
        )


def _api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class GuardMiddleware:
    """For paths under /v1/: 413 on a declared or streamed body over `max_body_bytes`,
    401 without a valid key (when keys or a hook are configured), 429 over the rate."""

    def __init__(
        self, app: ASGIApp, authenticate: Authenticate | None, limiter: RateLimiter | None, max_body_bytes: int
    ):
        self.app, self.authenticate, self.limiter, self.max_body_bytes = app, authenticate, limiter, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        principal = None
        if self.authenticate is not None:
            principal = self.authenticate(_api_key(headers), headers)
            if principal is None:
                return await _refuse(
                    send,
                    401,
                    "missing or invalid API key: send Authorization: Bearer <key>",
                    "authorization",
                    {"www-authenticate": 'Bearer realm="rlhf-gateway"'},
                )
        if self.limiter is not None:
            client = scope.get("client")
            wait = self.limiter.acquire(principal or f"addr:{client[0] if client else '?'}")
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return await _refuse(
                    send,
                    429,
                    f"rate limit of {self.limiter.describe()} exceeded; retry after {retry}s",
                    None,
                    {"retry-after": str(retry)},
                )

        declared = headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _refuse(
                send,
                413,
                f"request body is {declared} bytes; the limit is max_body_bytes={self.max_body_bytes}",
                "body",
            )

        seen = 0
        limit = self.max_body_bytes

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked upload without a length: stop reading at the limit
                    raise ApiError(413, f"request body exceeds the limit max_body_bytes={limit}", "body")
            return message

        await self.app(scope, counting_receive, send)


async def _refuse(
    send: Send, status: int, message: str, param: str | None, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
