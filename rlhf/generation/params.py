"""Request validation: every refusal names the field and the limit, so the caller knows what to fix
(INVALID_ARGUMENT over gRPC, 400 over HTTP; never a bare 500 or a stack trace)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf import priorities
from rlhf.generation.types import InvalidRequest, Sampling

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_PENALTY = 2.0  # frequency/presence penalty: -2..2, as OpenAI
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_JSON_SCHEMA_CHARS = 32768


@dataclass(frozen=True)
class Limits:
    max_model_len: int = 2048  # prompt + completion tokens
    default_max_tokens: int = 128
    max_max_tokens: int = 1024
    max_n: int = 16
    vocab_size: int = 49152


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise InvalidRequest("messages", "at least one message is required")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m['role']!r}")


def check_prompt_ids(ids: list[int], limits: Limits) -> None:
    if not ids:
        raise InvalidRequest("prompt_token_ids", "at least one token is required")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")


def sampling_from(
    *,
    n: int,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int,
    stop: list[str],
    seed: int | None,
    prompt_len: int,
    limits: Limits,
    ignore_eos: bool = False,
    priority: int = 0,
    top_logprobs: int = 0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    json_object: bool = False,
    json_schema: str = "",
) -> Sampling:
    """Fill defaults (0 / unset = default) and check every limit, including the context."""
    n = n or 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest("params.n", f"must be between 1 and {limits.max_n}, got {n}")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest("params.temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {temperature:g}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest("params.top_p", f"must be in (0, 1], got {top_p:g}")
    if len(stop) > MAX_STOP:
        raise InvalidRequest("params.stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(
                "params.stop", f"each stop string needs 1 to {MAX_STOP_CHARS} characters, got {len(s)}"
            )
    if prompt_len >= limits.max_model_len:
        raise InvalidRequest(
            "prompt",
            f"the prompt has {prompt_len} tokens; the context limit max_model_len is {limits.max_model_len} "
            "and leaves no room to generate",
        )
    room = limits.max_model_len - prompt_len
    max_tokens = max_tokens or min(limits.default_max_tokens, room)
    if not 1 <= max_tokens <= limits.max_max_tokens:
        raise InvalidRequest("params.max_tokens", f"must be between 1 and {limits.max_max_tokens}, got {max_tokens}")
    if max_tokens > room:
        raise InvalidRequest(
            "params.max_tokens",
            f"{max_tokens} new tokens after a {prompt_len}-token prompt exceed max_model_len={limits.max_model_len}; "
            f"at most {room}",
        )
    if not 0 <= priority <= priorities.MAX:
        raise InvalidRequest("params.priority", f"must be between 0 and {priorities.MAX} (lower first), got {priority}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("params.top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
            raise InvalidRequest(
                f"params.{name}", f"must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value:g}"
            )
    bias = dict(logit_bias or {})
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidRequest("params.logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
    for token, value in bias.items():
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequest(
                "params.logit_bias", f"token id {token} is outside the vocabulary [0, {limits.vocab_size})"
            )
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidRequest(
                "params.logit_bias", f"the bias of token {token} must be between -100 and 100, got {value:g}"
            )
    if json_object and json_schema:
        raise InvalidRequest("params.json_schema", "set json_object or json_schema, not both")
    if len(json_schema) > MAX_JSON_SCHEMA_CHARS:
        raise InvalidRequest(
            "params.json_schema", f"{len(json_schema)} characters; the limit is {MAX_JSON_SCHEMA_CHARS}"
        )
    return Sampling(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=tuple(stop),
        seed=seed,
        ignore_eos=ignore_eos,
        priority=priority,
        top_logprobs=top_logprobs,
        frequency_penalty=float(frequency_penalty),
        presence_penalty=float(presence_penalty),
        logit_bias=tuple(sorted(bias.items())),
        json_object=json_object,
        json_schema=json_schema,
    )
