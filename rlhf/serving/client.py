"""Client side of the scaffold: channels with retries on UNAVAILABLE (and, given the control
token, its `authorization` metadata on every call: rlhf/serving/auth.py), and health checks.

Load balancing follows the address. `host:port` is one connection to whichever address the
name resolves to first (gRPC's pick_first): a Kubernetes ClusterIP Service, one pod per
client. `dns:///host:port` resolves every A record and spreads calls over all of them
(round_robin): point it at a headless Service (clusterIP: None) and a client uses every
generator or reference pod, e.g. RLHF_GENERATOR_ADDR=dns:///generator-headless.rlhf.svc:50051.
`load_balancing=` overrides the choice."""

from __future__ import annotations

import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.serving.auth import control_metadata

# Retry only UNAVAILABLE (the server is not there yet or is restarting): every other code
# is an answer, and retrying it would repeat work or hide a caller's mistake.
_RETRY = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
LOAD_BALANCING = ("pick_first", "round_robin")


def load_balancing_for(address: str) -> str:
    """round_robin for a `dns:///` address (every resolved backend), else pick_first."""
    return "round_robin" if address.startswith("dns:") else "pick_first"


def channel_options(max_message_mb: int = 64, load_balancing: str = "pick_first") -> list[tuple[str, object]]:
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING}, not {load_balancing!r}")
    limit = max_message_mb * 1024 * 1024
    config = {**_RETRY, "loadBalancingConfig": [{load_balancing: {}}]}
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
    ]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details: Any, extra: tuple[tuple[str, str], ...]):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.metadata = tuple(details.metadata or ()) + extra
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self.extra = control_metadata(token)

    def _call(self, continuation, details, request):
        return continuation(_SyncDetails(details, self.extra), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


class _AioBearer(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self.extra = control_metadata(token)

    async def _call(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ()) + self.extra))
        return await continuation(
            grpc.aio.ClientCallDetails(
                details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
            ),
            request,
        )

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


def aio_channel(
    address: str, max_message_mb: int = 64, control_token: str = "", load_balancing: str | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel; with `control_token`, every call carries it (control RPCs need it).
    `load_balancing`: None follows the address (load_balancing_for)."""
    interceptors = [_AioBearer(control_token)] if control_token else None
    options = channel_options(max_message_mb, load_balancing or load_balancing_for(address))
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(
    address: str, max_message_mb: int = 64, control_token: str = "", load_balancing: str | None = None
) -> grpc.Channel:
    """A blocking channel; with `control_token`, every call carries it (control RPCs need it).
    `load_balancing`: None follows the address (load_balancing_for)."""
    channel = grpc.insecure_channel(
        address, options=channel_options(max_message_mb, load_balancing or load_balancing_for(address))
    )
    return grpc.intercept_channel(channel, _SyncBearer(control_token)) if control_token else channel


def check_health(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The standard health status name ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE"."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return (
                "UNREACHABLE"
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else e.code().name
            )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
