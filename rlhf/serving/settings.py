"""One settings class per service, read from the environment and the command line.

Every field has a default and a one-line description. Environment variables carry the
`RLHF_` prefix (`RLHF_PORT=50061`); the same field is a CLI flag (`--port 50061`).
Each service runs in its own process (or container), so per-service values such as the
port live in that process's environment; `rlhf config` prints every field of every service.

One source per setting:
- a field two services read (the policy's `model`, the peers' addresses, the weight store)
  is declared once, here, and the services inherit it; `rlhf up` gives every service the
  same environment, so one name must mean one thing everywhere;
- a library config (`LearnerConfig`, the reward `TrainerConfig` / `LoopConfig`, the rollout
  `WorkerConfig`) is a pydantic model that holds its fields' defaults and descriptions; the
  service's settings carry each of its fields under the service's prefix (`config_fields`)
  and build the config back from them (`config_from`), so no default is written twice;
- a renamed setting keeps its old environment variable: a class lists `renamed = {old: new}`,
  and `RLHF_<OLD>` is read (with a warning) when `RLHF_<NEW>` is not set.
Durations end in `_seconds` (or `_ms`, `_hours` where that is the natural unit).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, TypeVar

from pydantic import BaseModel, Field, SecretStr, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

S = TypeVar("S", bound="CommonSettings")
C = TypeVar("C", bound=BaseModel)
ENV_PREFIX = "RLHF_"

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    return Path(os.environ.get("RLHF_HOME", "~/.cache/rlhf")).expanduser() / "state"


class RenamedEnv(PydanticBaseSettingsSource):
    """`RLHF_<OLD>` for each `old: new` of the class's `renamed`, when `RLHF_<NEW>` is unset:
    deployments that still set an old name keep working, and are told the new one."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the environment itself

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items()}
        out: dict[str, Any] = {}
        for old, new in getattr(self.settings_cls, "renamed", {}).items():
            old_var, new_var = ENV_PREFIX + old.upper(), ENV_PREFIX + new.upper()
            if env.get(old_var) and new_var not in env:  # an empty old value meant "the default"
                out[new] = env[old_var]
                log.warning("%s is deprecated: set %s (same value) instead", old_var, new_var)
        return out


class CommonSettings(BaseSettings):
    """Fields every service shares."""

    renamed: ClassVar[dict[str, str]] = {}  # old field name → new; RLHF_<OLD> is still read (RenamedEnv)
    # prefix → the library configs whose fields this class carries under it (settings_model)
    library_configs: ClassVar[dict[str, tuple[type[BaseModel], ...]]] = {}

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 only behind a firewall")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
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
    control_token: SecretStr = Field(
        SecretStr(""),
        description="shared secret of the control RPCs (UpdateWeights, LoadVersion, Pause, Resume, Rollback): "
        "clients send `authorization: Bearer <token>`; empty: <state_dir>/control.token, else they are "
        "refused (set it in the environment, not on the command line)",
    )
    tracing: Literal["none", "console", "otlp"] = Field(
        "none",
        description="OpenTelemetry traces (rlhf/tracing.py): none (no exporter, no-op spans), console (one JSON "
        "span per line to tracing_file or stdout) or otlp (OTLP/gRPC to otlp_endpoint: Jaeger, Tempo, a collector)",
    )
    otlp_endpoint: str = Field(
        "",
        description="tracing=otlp: the collector's OTLP/gRPC address, e.g. http://localhost:4317; empty = "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317",
    )
    tracing_file: Path | None = Field(
        None, description="tracing=console: append the spans to this file instead of standard output"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # after the environment, so that RLHF_<NEW> wins over RLHF_<OLD>
        return init_settings, env_settings, RenamedEnv(settings_cls), dotenv_settings, file_secret_settings


class GrpcServiceSettings(CommonSettings):
    """Fields of a service that serves gRPC."""

    port: int = Field(50050, description="gRPC port")
    metrics_port: int = Field(9100, description="Prometheus /metrics HTTP port; 0 disables it")
    max_message_mb: int = Field(64, description="largest gRPC message accepted or sent, MiB")
    max_concurrent_rpcs: int = Field(256, description="RPCs served at once before RESOURCE_EXHAUSTED")


# --- fields more than one service reads: declared once, inherited ----------------------
# Mixed into a service's settings beside CommonSettings / GrpcServiceSettings.


class PolicyModelSettings(BaseModel):
    model: str = Field(
        "demo",
        description='the policy\'s base weights: "demo" (SmolLM2-135M-Instruct) or a folder; the generator serves '
        "them, the learner trains from them, the reference service keeps them frozen as π_ref, the "
        'reward service reads them only when reward_backbone is "policy"',
    )


class WeightStoreSettings(BaseModel):
    weight_store: Path | None = Field(
        None,
        description="weight-store folder the learner writes versions to and generators load them from; "
        "default <state_dir>/weights",
    )

    def weight_store_path(self) -> Path:
        return self.weight_store or self.state_dir / "weights"  # type: ignore[attr-defined]


class GeneratorAddress(BaseModel):
    generator_addr: str = Field("127.0.0.1:50051", description="GenerationService address")


class RewardAddress(BaseModel):
    reward_addr: str = Field("127.0.0.1:50052", description="RewardService address")


# --- library configs as settings ---------------------------------------------------------


def config_fields(config: type[BaseModel], prefix: str) -> dict[str, tuple[Any, FieldInfo]]:
    """Every field of `config` as a settings field `prefix + name` (same type, default and
    description), in the form `pydantic.create_model` takes."""
    return {prefix + name: (f.annotation, copy.deepcopy(f)) for name, f in config.model_fields.items()}


def config_from(settings: BaseModel, config: type[C], prefix: str, **overrides: Any) -> C:
    """`config` built from the settings fields `config_fields(config, prefix)` declared,
    `overrides` on top."""
    values = {name: getattr(settings, prefix + name) for name in config.model_fields}
    return config.model_validate({**values, **overrides})


def settings_model(name: str, base: type[S], doc: str, configs: dict[str, tuple[type[BaseModel], ...]]) -> type[S]:
    """A service's settings class: `base` (its own fields) plus, for each `prefix: (Config, ...)`,
    every field of each Config under that prefix."""
    fields: dict[str, Any] = {}
    for prefix, classes in configs.items():
        for cls in classes:
            new = config_fields(cls, prefix)
            clash = (set(new) & set(fields)) | (set(new) & set(base.model_fields))
            if clash:
                raise TypeError(f"{name}: settings declared twice: {sorted(clash)}")
            fields.update(new)
    cls = create_model(name, __base__=base, __doc__=doc, __module__=base.__module__, **fields)
    cls.library_configs = {**base.library_configs, **configs}
    return cls


def load_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Environment first, then CLI flags on top (argv=None reads no CLI at all)."""
    if argv is None:
        return cls()
    return cls(_cli_parse_args=list(argv), _cli_prog_name=prog)
