"""Plain data shared by the generation backends, the servicer and the tests (no grpc, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import InvalidArgument


class InvalidRequest(InvalidArgument):
    """A request the caller can fix: names the offending field and the limit it broke
    (INVALID_ARGUMENT over gRPC)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class WeightsRefused(ValueError):
    """An update that must not be served (bad sha256, wrong names or shapes, bad adapter).

    The version serving before the update keeps serving."""


class NotPublished(WeightsRefused):
    """A well-formed update of a version the learner did not publish for serving (not in the
    weight store as promoted, or not announced; see rlhf/generation/weights.py), or whose
    sha256 is not the published one. gRPC PERMISSION_DENIED."""


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request (defaults already filled in)."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # sample past EOS until max_tokens (benchmarks)
    priority: int = 0  # lower is scheduled first; 0 = interactive
    top_logprobs: int = 0  # also report the k most likely tokens at each step
    frequency_penalty: float = 0.0  # logit -= f * count(token) in this sample so far
    presence_penalty: float = 0.0  # logit -= p once the token occurred in this sample
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    json_object: bool = False  # constrained decoding: a JSON object
    json_schema: str = ""  # constrained decoding: JSON satisfying this schema (JSON text)

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

    @property
    def structured(self) -> bool:
        return self.json_object or bool(self.json_schema)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Delta:
    """New output of one sample since its previous delta.

    `logprobs[i]` is log π(token_ids[i] | context) under the serving weights, from the raw
    logits: temperature and top-p change which token is drawn, not the reported log-prob."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on the sample's last delta
    # with Sampling.top_logprobs = k: per token, the k most likely (token id, log-prob)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class SampleOut:
    """A finished sample, the sum of its deltas."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, d: Delta) -> None:
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.top += d.top
        self.text += d.text
        if d.finish_reason:
            self.finish_reason = d.finish_reason
