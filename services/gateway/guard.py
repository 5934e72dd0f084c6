"""Who may call /v1 and how much: API keys (or a hook), per-key rate limits, body size.

Runs as ASGI middleware, so a refused request costs no body read and no routing.

Auth hook: set `auth_hook="mypkg.auth:check"` to replace the static key list with

    def check(api_key: str | None, headers: Mapping[str, str]) -> str | None:
        '''The caller's principal (rate-limit bucket), or None to answer 401.'''

`api_key` is the bearer token of `Authorization: Bearer <key>` (what OpenAI clients
send) or of `X-API-Key`. The principal never becomes a metric label.

Raters: every feedback event says who gave it (`Feedback.rater_id`, `anonymous`), decided
here for /v1/feedback and handed to the route in `scope["state"]["rater"]`, first of

1. the principal of the key or auth hook (a static key's is `key:<16 hex>`, an HMAC of the
   key under the rater secret: stable when the key list is edited, and not a hash anyone
   could test guessed keys against);
2. `header:<value>` of the `rater_header` a deployment's proxy sets, trusted only when that
   setting names it (the proxy must strip it from what clients send);
3. `web:<id>` from the signed `rlhf_rater` cookie the gateway gives the web page (set on
   `GET /`, HMAC-SHA256 under the rater secret). A cookie whose signature does not verify
   is ignored: the feedback is kept and marked anonymous, as if no cookie had come, since
   refusing it would only lose a judgement that an anonymous request could have sent anyway;
4. anonymous: `rater_id` empty, `anonymous` true.

Identified raters may be held to `feedback_rate_limit_rps` per rater (429 naming it);
anonymous feedback is held only to the per-key / per-address `rate_limit_rps`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import limits
import limits.storage
import limits.strategies
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import ApiError, error_body
from services.gateway.metrics import RATER_COOKIES_IGNORED

Authenticate = Callable[[str | None, Mapping[str, str]], str | None]


def static_keys(keys: list[str], secret: bytes) -> Authenticate:
    encoded = [k.encode() for k in keys]
    principals = [f"key:{hmac.new(secret, b'rlhf-key-v1:' + k, hashlib.sha256).hexdigest()[:16]}" for k in encoded]

    def check(api_key: str | None, headers: Mapping[str, str]) -> str | None:
        if api_key is None:
            return None
        given = api_key.encode()
        # compare with every key, in constant time, so timing reveals nothing
        matches = [hmac.compare_digest(given, k) for k in encoded]
        return principals[matches.index(True)] if any(matches) else None

    return check


def load_hook(spec: str) -> Authenticate:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f'auth_hook must look like "package.module:function", not {spec!r}')
    return getattr(importlib.import_module(module), name)


class _MemoryStorage(limits.storage.MemoryStorage):
    """limits' MemoryStorage with its expiry sweep once a second instead of every 10 ms.

    limits (5.x) arms a 10 ms `threading.Timer` on a hit whenever the last one has run out,
    so at 100+ requests/s nearly every request starts an OS thread: measured here, a hit
    12 ms after the previous one took 307–339 µs (median) against 8 µs back to back, and
    110 µs with this sweep. Counts are unaffected (every read drops an expired counter
    itself); the sweep only frees memory, and a second later is as good. Should a later
    limits rename its private hook, this override stops applying and the stock 10 ms
    sweep returns: slower, never wrong."""

    SWEEP_S = 1.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # limits' name-mangled hook
        if not self.timer.is_alive():
            self.timer = threading.Timer(self.SWEEP_S, self._MemoryStorage__expire_events)
            self.timer.daemon = True
            self.timer.start()


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

    def __init__(self, rate: float, burst: int, setting: str = "rate_limit"):
        self.rate, self.burst, self.setting = rate, max(1, burst), setting
        self.window_s = max(1, math.ceil(self.burst / rate))
        self.amount = max(self.burst, round(rate * self.window_s))
        self.item = limits.RateLimitItemPerSecond(self.amount, self.window_s, namespace=setting)
        self.storage = _MemoryStorage()
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
            f"{self.setting}_rps={self.rate:g}, {self.setting}_burst={self.burst})"
        )


RATER_COOKIE = "rlhf_rater"
RATER_COOKIE_MAX_AGE_S = 365 * 24 * 3600
MAX_RATER_HEADER_CHARS = 256


def rater_secret(configured: str, state_dir: Path) -> bytes:
    """The configured rater secret, or the one generated once into
    <state_dir>/gateway/rater-secret (mode 0600; replicas behind one address must share a
    configured one, or each ignores the others' cookies)."""
    if configured:
        return configured.encode()
    path = state_dir / "gateway" / "rater-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another gateway made one first: then use that one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


class RaterCookies:
    """`<id>.<signature>`: a random id and its HMAC-SHA256 under the rater secret, base64url."""

    def __init__(self, secret: bytes):
        self.secret = secret

    def _sign(self, uid: str) -> str:
        mac = hmac.new(self.secret, b"rlhf-rater-v1:" + uid.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def issue(self) -> str:
        uid = secrets.token_urlsafe(16)
        return f"{uid}.{self._sign(uid)}"

    def verify(self, value: str) -> str | None:
        """The id a cookie value carries, or None if it is not one this secret signed."""
        uid, dot, sig = value.partition(".")
        if not dot or not uid or not hmac.compare_digest(sig.encode(), self._sign(uid).encode()):
            return None
        return uid

    def set_cookie_header(self, scope: Scope) -> tuple[bytes, bytes]:
        attrs = f"Path=/; Max-Age={RATER_COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Strict"
        if scope.get("scheme") == "https":
            attrs += "; Secure"
        return b"set-cookie", f"{RATER_COOKIE}={self.issue()}; {attrs}".encode()


@dataclass(frozen=True)
class Rater:
    id: str  # "" when anonymous; never a metric label
    via: str  # key | header | cookie | anonymous: the bounded label of rlhf_gateway_feedback_raters_total

    @property
    def anonymous(self) -> bool:
        return not self.id


ANONYMOUS = Rater("", "anonymous")


def _api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class GuardMiddleware:
    """For paths under /v1/: 413 on a declared or streamed body over `max_body_bytes`,
    401 without a valid key (when keys or a hook are configured), 429 over the rate; for
    /v1/feedback also who the rater is, and 429 over the per-rater rate. `GET /` (the web
    page) gets a signed rater cookie when it brings no valid one."""

    def __init__(
        self,
        app: ASGIApp,
        authenticate: Authenticate | None,
        limiter: RateLimiter | None,
        max_body_bytes: int,
        cookies: RaterCookies | None = None,
        rater_header: str = "",
        feedback_limiter: RateLimiter | None = None,
    ):
        self.app, self.authenticate, self.limiter, self.max_body_bytes = app, authenticate, limiter, max_body_bytes
        self.cookies, self.rater_header, self.feedback_limiter = cookies, rater_header.lower(), feedback_limiter

    def _cookie_rater(self, headers: Mapping[str, str]) -> str | None:
        if self.cookies is None or "cookie" not in headers:
            return None
        value = cookie_parser(headers["cookie"]).get(RATER_COOKIE)
        if value is None:
            return None
        uid = self.cookies.verify(value)
        if uid is None:
            RATER_COOKIES_IGNORED.inc()
        return uid

    def rater(self, principal: str | None, headers: Mapping[str, str]) -> Rater:
        """Who gives this feedback (first of: principal, trusted header, signed cookie)."""
        if principal is not None:
            return Rater(principal, "key")
        if self.rater_header and headers.get(self.rater_header, "").strip():
            value = headers[self.rater_header].strip()
            if len(value) > MAX_RATER_HEADER_CHARS:
                raise ApiError(
                    400,
                    f"{self.rater_header}: {len(value)} characters; the limit is {MAX_RATER_HEADER_CHARS} "
                    "(the header named by rater_header)",
                    self.rater_header,
                )
            return Rater(f"header:{value}", "header")
        uid = self._cookie_rater(headers)
        return Rater(f"web:{uid}", "cookie") if uid else ANONYMOUS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and self.cookies is not None:
            return await self._page(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        principal = None
        # the feedback export checks its own keys (feedback_export_keys, feedback.py)
        export = scope["path"] == "/v1/feedback" and scope.get("method") == "GET"
        if self.authenticate is not None and not export:
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

        if scope["path"] == "/v1/feedback" and not export:
            try:
                rater = self.rater(principal, headers)
            except ApiError as e:
                return await _refuse(send, e.status_code, e.detail, e.param)
            if self.feedback_limiter is not None and not rater.anonymous:
                wait = self.feedback_limiter.acquire(rater.id)
                if wait > 0:
                    retry = max(1, math.ceil(wait))
                    return await _refuse(
                        send,
                        429,
                        f"feedback rate limit of {self.feedback_limiter.describe()} per rater exceeded; "
                        f"retry after {retry}s",
                        None,
                        {"retry-after": str(retry)},
                    )
            scope.setdefault("state", {})["rater"] = rater

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

    async def _page(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The web page: hand out a rater cookie unless a valid one came with the request."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self._cookie_rater(headers) is not None:
            return await self.app(scope, receive, send)
        cookies = self.cookies
        assert cookies is not None

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                message = {**message, "headers": [*message.get("headers", []), cookies.set_cookie_header(scope)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


async def _refuse(
    send: Send, status: int, message: str, param: str | None, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
