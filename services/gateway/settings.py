"""GatewaySettings: every field has a default and a description (env RLHF_<FIELD>, or --flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from rlhf.serving import CommonSettings
from rlhf.serving.settings import GeneratorAddress, RewardAddress


class GatewaySettings(RewardAddress, GeneratorAddress, CommonSettings):
    # the generator has its own max_n and default_max_tokens; `rlhf up` gives every service the
    # same environment, so the gateway's limits have names of their own
    renamed = {"max_n": "max_choices", "default_max_tokens": "default_max_completion_tokens"}

    # --- network -----------------------------------------------------------------------
    http_port: int = Field(8000, description="HTTP port of the API and web page (also serves /metrics)")
    generate_timeout_seconds: float = Field(120.0, description="deadline of one Generate call to the generator")
    model_name: str = Field(
        "", description="model id shown in /v1/models and completions; empty = the generator's model name"
    )
    score_timeout_seconds: float = Field(
        10.0, description="deadline of one Score call; past it the comparison falls back to the first two"
    )

    # --- comparisons (n=2): which two of compare_candidates samples are shown ----------
    compare_candidates: int = Field(
        2,
        ge=2,
        le=16,
        description="answers sampled when a request asks for exactly 2 (a comparison); "
        "2 = no choice, today's behaviour",
    )
    compare_selection: Literal["first", "rm_uncertain", "rm_extremes", "diverse"] = Field(
        "first",
        description="which 2 of compare_candidates are shown: first two, the pair the reward model (at reward_addr) "
        "is least sure about, its best and worst, or the most different pair (shingle Jaccard)",
    )

    # --- the canary (issue 15, docs/canary.md): the generator's GetInfo says stable, candidate, share
    canary_compare_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="while a candidate is in canary: share of comparisons (n=2) that show one answer of the "
        "candidate and one of the stable version, in random order (the head-to-head evidence); the rest show "
        "two answers of the conversation's version",
    )
    canary_info_ttl_seconds: float = Field(
        1.0, gt=0.0, description="how long the generator's stable/candidate/share (GetInfo) is reused before asking"
    )
    canary_pinned_conversations: int = Field(
        100_000,
        ge=0,
        description="conversations whose version is remembered (LRU) so a conversation keeps its version while it is "
        "served, whatever share or candidate comes next; past this the oldest fall back to the hash split",
    )

    # --- serving: RM-reranked best-of-n ------------------------------------------------
    serve_best_of: int = Field(
        1,
        ge=1,
        le=16,
        description="answers sampled for a one-answer chat (n=1); the one the reward model (at reward_addr) scores "
        "highest is served. Users see what the RM learned before the policy does, at best_of times the "
        "generation tokens and one Score call per chat; 1 = off. Comparisons (n=2) are not reranked",
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
    rate_limit_rps: float = Field(
        0.0, description="/v1 requests per second each key (or client address) may make; 0 = no limit"
    )
    rate_limit_burst: int = Field(20, description="requests a key may make at once before the rate limit applies")

    # --- who gave a feedback (Feedback.rater_id / anonymous) ---------------------------
    rater_header: str = Field(
        "",
        description="request header a trusted proxy sets to the person's id (e.g. X-Forwarded-User), used as rater "
        "when no API key names one; empty = no header is trusted",
    )
    rater_secret: SecretStr = Field(
        SecretStr(""),
        description="HMAC key signing the web page's rater cookie and fingerprinting API keys into rater ids; empty = "
        "generated once into <state_dir>/gateway/rater-secret (replicas behind one address must share one)",
    )
    feedback_rate_limit_rps: float = Field(
        0.0, ge=0, description="feedback requests per second each identified rater may send; 0 = no limit"
    )
    feedback_rate_limit_burst: int = Field(
        30, ge=1, description="feedback requests a rater may send at once before feedback_rate_limit_rps applies"
    )
    feedback_export_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="keys that may read GET /v1/feedback (Authorization: Bearer <key>), comma separated; "
        "empty = the export is off (403)",
    )

    # --- privacy ------------------------------------------------------------------------
    redact_pii: bool = Field(
        True,
        description="replace e-mail addresses, phone and card numbers, secrets and IP addresses in stored and "
        "published prompts, answers, comments and corrected answers by <TYPE> placeholders",
    )

    # --- request limits (413/422 with the limit named) ---------------------------------
    max_body_bytes: int = Field(1_000_000, description="largest request body accepted, bytes")
    max_messages: int = Field(128, description="most chat messages in one request")
    max_chars: int = Field(64_000, description="most characters of message content in one request")
    max_choices: int = Field(4, description="most choices (n) one completion request may ask for")
    max_tokens_limit: int = Field(1024, description="largest max_tokens a request may ask for")
    default_max_completion_tokens: int = Field(
        0, description="max_tokens when a request gives none; 0 = the generator's default"
    )
    max_feedback_chars: int = Field(16_000, description="most characters in a feedback comment or corrected answer")
    max_json_depth: int = Field(
        64,
        ge=1,
        le=512,
        description="deepest nesting of arrays and objects in a request body (the parser itself stops near 1000)",
    )

    # --- durable outbox and relay to Kafka ---------------------------------------------
    outbox_path: Path | None = Field(
        None, description="SQLite outbox and served-response store; default <state_dir>/gateway/outbox.db"
    )
    outbox_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="durability of a feedback commit: FULL fsyncs (survives a power cut), "
        "NORMAL survives a process crash",
    )
    interaction_synchronous: Literal["FULL", "NORMAL"] = Field(
        "NORMAL",
        description="durability of a served response + its Interaction event: NORMAL saves an fsync per completion",
    )
    relay_interval_seconds: float = Field(
        0.2, description="how often the relay looks for pending events (it is also woken on each commit)"
    )
    relay_batch: int = Field(500, description="most events the relay publishes per round")
    relay_max_backoff_seconds: float = Field(
        10.0, description="longest wait between relay retries while the broker is down"
    )
    relay_publish_timeout_seconds: float = Field(
        10.0, description="how long the relay waits for the broker's acknowledgements"
    )
    outbox_retention_seconds: float = Field(
        3600.0, description="how long acknowledged events stay in the outbox before pruning"
    )
    response_retention_hours: float = Field(168.0, description="how long served responses can still receive feedback")

    @field_validator("api_keys", "feedback_export_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def outbox_file(self) -> Path:
        return self.outbox_path or self.state_dir / "gateway" / "outbox.db"
