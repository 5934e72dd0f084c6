"""Request bodies: OpenAI's chat-completion and (legacy) completion requests, and the
gateway's own feedback request. Responses are built as plain dicts in routes.

Nothing is silently ignored: every field OpenAI defines is either honoured, accepted only
at the value that means "no effect" (`tool_choice: "none"`, `modalities: ["text"]`), or
refused with a 400 that names it and says why (`unsupported_parameter`); a field OpenAI
does not define is refused as unknown (`extra="forbid"`). The gateway's own extensions
(`conversation_id`) are listed as such in docs/gateway.md.

Every value a body may carry is checked here against what the next hop can hold, so a
body that parses never fails later (a 500): text is UTF-8-encodable (`Text`), integers
fit their protobuf field (`seed`: int64), floats are finite. Limits that are settings
(max_choices, max_tokens_limit, max_chars, ...) are checked in the routes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Ids the gateway hands out are hex with a prefix; feedback ids are checked against this
# shape first, so a typo is a 422 naming the field rather than a database lookup.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # SamplingParams.seed is a protobuf int64


def _utf8(s: str) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); Python decodes it to a lone
    surrogate, which protobuf, SQLite and Kafka (all UTF-8) cannot encode."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"character {e.start} is a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x}); "
                "text must be valid Unicode: send the character itself or both halves of its pair"
            ) from None
    return s


# Every free-text field of a request body: a str that UTF-8 can encode.
Text = Annotated[str, AfterValidator(_utf8)]


UNSUPPORTED = "unsupported_parameter"  # the error type (and OpenAI error code) of a refusal


def unsupported(value: Any, why: str) -> PydanticCustomError:
    """The refusal of an OpenAI field's `value` this gateway cannot honour (the error
    handler puts the field's name in front)."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 60 else shown[:59] + "…"
    return PydanticCustomError(UNSUPPORTED, "{value} is not supported: {why}", {"value": shown, "why": why})


NO_TOOLS = "the served policy is a plain text chat model: no tool or function calling"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text

    @field_validator("type", mode="before")
    @classmethod
    def _only_text(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "text":
            raise unsupported(v, "the served policy reads text only (content parts of type text)")
        return v


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart], None] = None
    # OpenAI's assistant-message fields of tool calling, audio and refusals: refused when set
    name: Any = None
    tool_calls: Any = None
    function_call: Any = None
    tool_call_id: Any = None
    audio: Any = None
    refusal: Any = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_tool_roles(cls, v: Any) -> Any:
        if v in ("tool", "function"):
            raise unsupported(v, NO_TOOLS)
        return v

    @field_validator("name", "tool_calls", "function_call", "tool_call_id", "audio", "refusal", mode="before")
    @classmethod
    def _refuse_set(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return v
        why = {
            "name": "the chat template has no participant names",
            "audio": "the served policy reads and writes text only",
            "refusal": "the served policy writes no separate refusal",
        }.get(info.field_name, NO_TOOLS)
        raise unsupported(v, why)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def plain_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(max_length=64)
    description: Text | None = None
    # pydantic reads the key "schema" into this field (`schema` is a BaseModel method name)
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """{"type": "text"} (what the model does anyway), {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {...}}: the JSON ones through vLLM's structured
    outputs; the generator refuses them on the transformers backend."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only for type json_schema, not {self.type}")
        return self

    def schema_text(self) -> str:
        return json.dumps(self.json_schema.json_schema) if self.json_schema is not None else ""


def _bias(v: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON keys (strings), values -100..100."""
    out: dict[int, float] = {}
    for key, value in v.items():
        if not key.isdigit() or len(key) > 9:
            raise ValueError(f"keys are token ids (non-negative integers), got {key!r}")
        if not -100 <= value <= 100:
            raise ValueError(f"the bias of token {key} must be between -100 and 100, got {value:g}")
        out[int(key)] = value
    return out


LogitBias = Annotated[dict[str, Annotated[float, Field(allow_inf_nan=False)]], AfterValidator(_bias)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


def _stop_list(v: str | list[str] | None) -> list[str]:
    """OpenAI's `stop`: one string or up to 4."""
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    return stops


# OpenAI chat-completion fields with no effect here: accepted at the values that mean "no
# effect", refused (400, the field named) otherwise. The reason is what the refusal says.
NO_EFFECT: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), NO_TOOLS),
    "tool_choice": ((None, "none"), NO_TOOLS),
    "parallel_tool_calls": ((None,), NO_TOOLS),
    "functions": ((None, []), NO_TOOLS),
    "function_call": ((None, "none"), NO_TOOLS),
    "modalities": ((None, ["text"]), "the served policy writes text only"),
    "audio": ((None,), "the served policy writes text only"),
    "prediction": ((None,), "there is no speculative decoding from a predicted output"),
    "reasoning_effort": ((None,), "the served policy has no reasoning mode"),
    "verbosity": ((None,), "the served policy has no verbosity control"),
    "web_search_options": ((None,), "the gateway has no web search"),
    "service_tier": ((None, "auto", "default"), "the gateway has one service tier"),
    # every completion is stored (feedback needs it) and feeds training: store=false cannot hold
    "store": ((None, True), "every completion is stored, so that feedback can name it and the learner learn"),
    "metadata": ((None, {}), "completions are stored without OpenAI's metadata tags"),
}


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. A field this model does not declare is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field("default", description="echoed: the gateway serves one policy, under any name")
    messages: list[ChatMessageIn] = Field(min_length=1)
    n: int = Field(1, ge=1, description="choices to sample; 2 gives a comparison pair")
    # JSON has no NaN/Infinity, but Python's parser reads them (and 1e999 as inf)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, description="sampling seed: an int64, as in OpenAI's API"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    # accepted, no effect: OpenAI uses them to track abuse, which has no counterpart here
    user: Text | None = None
    safety_identifier: Text | None = None
    # accepted, no effect needed: vLLM caches shared prefixes without a key
    prompt_cache_key: Text | None = None
    # extension: continue a conversation; the gateway assigns one when absent
    conversation_id: str | None = Field(None, pattern=ID_PATTERN)

    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @field_validator(*NO_EFFECT, mode="before")
    @classmethod
    def _no_effect_only(cls, v: Any, info: ValidationInfo) -> Any:
        allowed, why = NO_EFFECT[info.field_name]
        if any(v == a and type(v) is type(a) for a in allowed):
            return v
        raise unsupported(v, why)

    _stops = field_validator("stop")(classmethod(lambda cls, v: _stop_list(v)))

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true (as in OpenAI's API)")
        return v


class CompletionRequest(BaseModel):
    """POST /v1/completions (OpenAI's legacy text completion): the prompt is tokenised as
    is, with no chat template. Not stored: feedback is for chats."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field("default", description="echoed: the gateway serves one policy, under any name")
    prompt: Text = Field(min_length=1, description="one prompt string (arrays and token ids are refused)")
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="the legacy API's count of alternatives")
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: Text | None = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise unsupported(v, "a prompt array: send one prompt string per request")
        return v

    @field_validator("echo", "suffix", "best_of", mode="before")
    @classmethod
    def _refuse_set(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or (info.field_name == "echo" and v is False) or (info.field_name == "best_of" and v == 1):
            return v
        why = {
            "echo": "the prompt is not repeated in the completion",
            "suffix": "the served policy has no fill-in-the-middle mode",
            "best_of": "server-side best-of is the gateway setting serve_best_of for chats",
        }[info.field_name]
        raise unsupported(v, why)

    _stops = field_validator("stop")(classmethod(lambda cls, v: _stop_list(v)))


_Id = Annotated[str, Field(pattern=ID_PATTERN)]

# Bounds of the structured extras a feedback may carry (422 naming the field and the limit).
MAX_SCORES = 16  # named scores per feedback
MAX_TAGS = 16
MAX_METADATA_KEYS = 16
MAX_LABEL_CHARS = 64  # a score's name or category, a tag, a metadata key
MAX_METADATA_VALUE_CHARS = 512
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # score names, tags, metadata keys
EVENT_ID_PATTERN = r"^[A-Za-z0-9-]{8,64}$"

_Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# a numeric score (finite) or a categorical one (a short label)
_ScoreValue = Union[Annotated[float, Field(allow_inf_nan=False)], Annotated[Text, Field(min_length=1, max_length=64)]]


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: Text = Field("", description="free text from the person")
    corrected_answer: Text = Field("", description="a better answer the person wrote")
    source: Literal["web", "api", "simulated"] = "api"
    # a client-chosen id makes retries idempotent: the same event_id is stored once
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)
    scores: dict[_Name, _ScoreValue] = Field(
        default_factory=dict,
        max_length=MAX_SCORES,
        description='named scores, numeric or categorical: {"helpfulness": 4, "harmless": "yes"}',
    )
    tags: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_TAGS, description="free labels (letters, digits, _.:-; 64 characters)"
    )
    metadata: dict[_Name, Annotated[Text, Field(max_length=MAX_METADATA_VALUE_CHARS)]] = Field(
        default_factory=dict, max_length=MAX_METADATA_KEYS, description="free string key/value pairs"
    )
    # the event this one replaces (the rater changed their vote); the gateway also finds it
    # itself: a rater's later feedback on the same response (or the same pair) supersedes their earlier one
    supersedes: str | None = Field(None, pattern=EVENT_ID_PATTERN)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class RatingIn(_FeedbackBase):
    kind: Literal["rating"]
    # the choice's response_id, or the completion's top-level id when it had one choice;
    # may be left out when the X-Response-Id header names it
    response_id: _Id | None = None
    value: Literal[1, -1] = Field(description="+1 thumbs up, -1 thumbs down")


class ComparisonIn(_FeedbackBase):
    kind: Literal["comparison"]
    chosen_id: _Id
    rejected_id: _Id
    # chosen: chosen_id is better; tie: both as good; both_bad: neither is good. For tie and
    # both_bad the two ids are just the two answers shown
    outcome: Literal["chosen", "tie", "both_bad"] = "chosen"


class FeedbackIn(RootModel[Annotated[Union[RatingIn, ComparisonIn], Field(discriminator="kind")]]):
    """POST /v1/feedback: {"kind": "rating", ...} or {"kind": "comparison", ...}."""
