"""Client side of the scaffold: channels with retries on UNAVAILABLE, and health checks."""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Retry only UNAVAILABLE (the server is not there yet or is restarting): every other code
# is an answer, and retrying it would repeat work or hide a caller's mistake.
_SERVICE_CONFIG = json.dumps(
    {
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
)


def channel_options(max_message_mb: int = 64) -> list[tuple[str, object]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]


def aio_channel(address: str, max_message_mb: int = 64) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))


def sync_channel(address: str, max_message_mb: int = 64) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options(max_message_mb))


def check_health(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The standard health status name ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE"."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
