"""GatewaySettings: every field has a default and a description (env RLHF_<FIELD>, or --flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from rlhf.serving import CommonSettings


class GatewaySettings(CommonSettings):
    # --- network -----------------------------------------------------------------------
    http_port: int = Field(8000, description="HTTP port of the API and web page (also serves /metrics)")
    generator_addr: str = Field("127.0.0.1:50051", description="GenerationService address")
    generate_timeout_seconds: float = Field(120.0, description="deadline of one Generate call to the generator")
    model_name: str = Field(
        "", description="model id shown in /v1/models and completions; empty = the generator's model name"
    )

    # --- who may call, and how often ---------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (Authorization: Bearer <key>), comma separated; empty = open gateway",
    )
    auth_hook: str = Field(
        "",
        description='"module:function" called as fn(api_key | None, headers) -> principal | None; replaces api_keys',
    )
    rate_limit_rps: float = Field(0.0, description="/v1 requests per second each key (or client address) may make; 0 = no limit")
    rate_limit_burst: int = Field(20, description="requests a key may make at once before the rate limit applies")

    # --- request limits (413/422 with the limit named) ---------------------------------
    max_body_bytes: int = Field(1_000_000, description="largest request body accepted, bytes")
    max_messages: int = Field(128, description="most chat messages in one request")
    max_chars: int = Field(64_000, description="most characters of message content in one request")
    max_n: int = Field(4, description="most choices (n) one completion request may ask for")
    max_tokens_limit: int = Field(1024, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(0, description="max_tokens when a request gives none; 0 = the generator's default")
    max_feedback_chars: int = Field(16_000, description="most characters in a feedback comment or corrected answer")

    # --- durable outbox and relay to Kafka ---------------------------------------------
    outbox_path: Path | None = Field(None, description="SQLite outbox and served-response store; default <state_dir>/gateway/outbox.db")
    outbox_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="durability of a feedback commit: FULL fsyncs (survives a power cut), NORMAL survives a process crash"
    )
    interaction_synchronous: Literal["FULL", "NORMAL"] = Field(
        "NORMAL", description="durability of a served response + its Interaction event: NORMAL saves an fsync per completion"
    )
    relay_interval_seconds: float = Field(0.2, description="how often the relay looks for pending events (it is also woken on each commit)")
    relay_batch: int = Field(500, description="most events the relay publishes per round")
    relay_max_backoff_seconds: float = Field(10.0, description="longest wait between relay retries while the broker is down")
    relay_publish_timeout_seconds: float = Field(10.0, description="how long the relay waits for the broker's acknowledgements")
    outbox_retention_seconds: float = Field(3600.0, description="how long acknowledged events stay in the outbox before pruning")
    response_retention_hours: float = Field(168.0, description="how long served responses can still receive feedback")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def outbox_file(self) -> Path:
        return self.outbox_path or self.state_dir / "gateway" / "outbox.db"
