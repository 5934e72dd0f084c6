"""One settings class per service, read from the environment and the command line.

Every field has a default and a one-line description. Environment variables carry the
`RLHF_` prefix (`RLHF_PORT=50061`); the same field is a CLI flag (`--port 50061`).
Each service runs in its own process (or container), so per-service values such as the
port live in that process's environment; `rlhf config` prints every field of every service.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="CommonSettings")


def default_state_dir() -> Path:
    return Path(os.environ.get("RLHF_HOME", "~/.cache/rlhf")).expanduser() / "state"


class CommonSettings(BaseSettings):
    """Fields every service shares."""

    model_config = SettingsConfigDict(
        env_prefix="RLHF_",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 only behind a firewall")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level"
    )
    log_format: Literal["json", "text"] = Field("json", description="structured JSON or plain text logs")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    topic_prefix: str = Field("rlhf", description="prefix of every Kafka topic name")
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="where checkpoints, the weight store and the outbox live",
    )
    unready_seconds: float = Field(
        1.0, description="on SIGTERM: report NOT_SERVING but keep accepting RPCs this long (load balancers catch up)"
    )
    drain_seconds: float = Field(
        5.0, description="on SIGTERM, after unready_seconds: refuse new RPCs, let in-flight ones finish this long"
    )


class GrpcServiceSettings(CommonSettings):
    """Fields of a service that serves gRPC."""

    port: int = Field(50050, description="gRPC port")
    metrics_port: int = Field(9100, description="Prometheus /metrics HTTP port; 0 disables it")
    max_message_mb: int = Field(64, description="largest gRPC message accepted or sent, MiB")
    max_concurrent_rpcs: int = Field(256, description="RPCs served at once before RESOURCE_EXHAUSTED")


def load_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Environment first, then CLI flags on top (argv=None reads no CLI at all)."""
    if argv is None:
        return cls()
    return cls(_cli_parse_args=list(argv), _cli_prog_name=prog)
