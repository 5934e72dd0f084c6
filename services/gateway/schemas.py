"""Request bodies: OpenAI's chat-completion request (the subset a text chat model serves)
and the gateway's own feedback request. Responses are built as plain dicts in routes."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator

# Ids the gateway hands out are hex with a prefix; feedback ids are checked against this
# shape first, so a typo is a 422 naming the field rather than a database lookup.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def plain_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field("default", description="ignored beyond echoing: the gateway serves one policy")
    messages: list[ChatMessageIn] = Field(min_length=1)
    n: int = Field(1, ge=1, description="choices to sample; 2 gives a comparison pair")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extension: continue a conversation; the gateway assigns one when absent
    conversation_id: str | None = Field(None, pattern=ID_PATTERN)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


_Id = Annotated[str, Field(pattern=ID_PATTERN)]


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field("", description="free text from the person")
    corrected_answer: str = Field("", description="a better answer the person wrote")
    source: Literal["web", "api", "simulated"] = "api"
    # a client-chosen id makes retries idempotent: the same event_id is stored once
    event_id: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{8,64}$")


class RatingIn(_FeedbackBase):
    kind: Literal["rating"]
    response_id: _Id
    value: Literal[1, -1] = Field(description="+1 thumbs up, -1 thumbs down")


class ComparisonIn(_FeedbackBase):
    kind: Literal["comparison"]
    chosen_id: _Id
    rejected_id: _Id


class FeedbackIn(RootModel[Annotated[Union[RatingIn, ComparisonIn], Field(discriminator="kind")]]):
    """POST /v1/feedback: {"kind": "rating", ...} or {"kind": "comparison", ...}."""
