"""Control-plane authentication: one shared bearer token on the RPCs that change what is
served or how the loop trains.

Guarded (`CONTROL_METHODS`): GenerationService `UpdateWeights` and `LoadVersion`, LearnerService
`Pause`, `Resume`, `Rollback`, `Promote` and `SetCanary`, RewardService `ReleaseRater`.
Everything else (Generate, GetInfo, GetStatus, ListVersions, GetCanary, Score, ListRaters,
LogProbs, health, reflection) stays open: reading cannot take the loop over.

- The token: setting `control_token` (`RLHF_CONTROL_TOKEN`), else the file
  `<state_dir>/control.token` that `rlhf up` writes (mode 0600); `control_token_from`.
- Server: `control_interceptors(settings, services)` adds a grpc.aio server interceptor that
  checks gRPC metadata `authorization: Bearer <token>` on the guarded methods, in constant
  time (`hmac.compare_digest`). A missing or wrong token, or a server that has no token at
  all (nothing configured must not mean "open"), answers UNAUTHENTICATED saying what to set,
  before the handler runs or reads a byte of a request stream; each refusal is a WARNING
  line and `rlhf_control_rpcs_refused_total{method,reason}`.
- Client: `control_metadata(token)` for one call, or a channel that sends it on every call
  (`rlhf.serving.client.sync_channel(address, control_token=...)` / `aio_channel`).

The token travels in metadata over the same plaintext HTTP/2 as every other call here
(services bind to 127.0.0.1 unless told otherwise). mTLS is not built in: across hosts, run
the channels under TLS (a service mesh or a TLS-terminating proxy) so the token is not sent
in the clear. The token is never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import grpc
from prometheus_client import Counter

log = logging.getLogger(__name__)

ENV_VAR = "RLHF_CONTROL_TOKEN"
TOKEN_FILE = "control.token"  # in the state dir, written by `rlhf up`
HEADER = "authorization"  # gRPC metadata keys are lower case
SCHEME = "Bearer "

CONTROL_METHODS: frozenset[str] = frozenset(
    {
        "/rlhf.v1.GenerationService/UpdateWeights",
        "/rlhf.v1.GenerationService/LoadVersion",
        "/rlhf.v1.LearnerService/Pause",
        "/rlhf.v1.LearnerService/Resume",
        "/rlhf.v1.LearnerService/Rollback",
        "/rlhf.v1.LearnerService/Promote",
        "/rlhf.v1.LearnerService/SetCanary",
        "/rlhf.v1.RewardService/ReleaseRater",
    }
)

REFUSED = Counter(
    "rlhf_control_rpcs_refused_total",
    "Control RPCs refused for want of the control token, by method and reason "
    "(missing, wrong, unconfigured: the server has none)",
    ["method", "reason"],
)


def control_token_from(state_dir: Path | None) -> str:
    """The control token: `RLHF_CONTROL_TOKEN` if set, else `<state_dir>/control.token`
    (stripped), else "" (no token: guarded RPCs are refused)."""
    token = os.environ.get(ENV_VAR, "").strip()
    if token or state_dir is None:
        return token
    try:
        return (Path(state_dir) / TOKEN_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""


def control_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `token` (`metadata=` of one call); empty without a token."""
    return ((HEADER, SCHEME + token),) if token else ()


# --- server -----------------------------------------------------------------------------


def _reason(metadata: Iterable[Any] | None, expected: bytes) -> str | None:
    """Why the call's metadata does not carry `expected` ("missing", "wrong"), or None."""
    if not expected:
        return "unconfigured"
    value = next((v for k, v in (metadata or ()) if k == HEADER), None)
    if value is None:
        return "missing"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value[: len(SCHEME)].lower() != SCHEME.lower():  # the scheme is case-insensitive (RFC 9110 §11.1)
        return "missing"
    # constant time, on bytes (compare_digest on str accepts ASCII only)
    return None if hmac.compare_digest(value[len(SCHEME) :].strip().encode(), expected) else "wrong"


_MESSAGES = {
    "unconfigured": "this server has no control token, so {method} is refused: set RLHF_CONTROL_TOKEN on it "
    "(`rlhf up` writes one to <state_dir>/control.token) and send `authorization: Bearer <token>`",
    "missing": "{method} needs gRPC metadata `authorization: Bearer <token>` with the server's RLHF_CONTROL_TOKEN",
    "wrong": "{method}: the bearer token does not match the server's RLHF_CONTROL_TOKEN",
}


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED at once."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, de, ser)
    return grpc.stream_stream_rpc_method_handler(deny_stream, de, ser)


class ControlAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses `methods` unless the call carries the bearer token (see the module docstring)."""

    def __init__(self, token: str, methods: Iterable[str] = CONTROL_METHODS):
        self._token = token.encode()
        self.methods = frozenset(methods)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        reason = _reason(details.invocation_metadata, self._token)
        if reason is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        REFUSED.labels(method, reason).inc()
        log.warning("control RPC refused", extra={"method": method, "reason": reason})
        return _refusing(handler, _MESSAGES[reason].format(method=method))


def control_interceptors(settings: Any, services: Iterable[str]) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor for a server that registers `services` (fully-qualified names): none
    when it serves no guarded method. The token: `settings.control_token`, else the
    state dir's token file."""
    methods = {m for m in CONTROL_METHODS if m.split("/")[1] in set(services)}
    if not methods:
        return []
    token = settings.control_token.get_secret_value().strip() or control_token_from(settings.state_dir)
    if not token:
        log.warning(
            "no control token: %s will be refused until RLHF_CONTROL_TOKEN is set",
            ", ".join(sorted(m.rsplit("/", 1)[-1] for m in methods)),
        )
    return [ControlAuthInterceptor(token, methods)]


__all__ = [
    "CONTROL_METHODS",
    "ControlAuthInterceptor",
    "ENV_VAR",
    "TOKEN_FILE",
    "control_interceptors",
    "control_metadata",
    "control_token_from",
]
