"""Plain data shared by the generation backends, the servicer and the tests (no grpc, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the caller can fix: names the offending field and the limit it broke."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class WeightsRefused(ValueError):
    """An update that must not be served (bad sha256, wrong names or shapes, bad adapter).

    The version serving before the update keeps serving."""


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request (defaults already filled in)."""

    n: int = 1
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False        # sample past EOS until max_tokens (benchmarks)
    priority: int = 0               # lower is scheduled first; 0 = interactive

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
    finish_reason: str | None = None   # "stop" or "length" on the sample's last delta


@dataclass
class SampleOut:
    """A finished sample, the sum of its deltas."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""

    def add(self, d: Delta) -> None:
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.text += d.text
        if d.finish_reason:
            self.finish_reason = d.finish_reason
