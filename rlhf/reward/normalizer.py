"""Running mean/std of raw reward-model scores, so PPO sees scores on a stable scale.

The RM keeps training, so old scores describe old weights: the count is capped at
`window`, which turns the merge into an exponential moving average with an effective
memory of about `window` scores. The statistics are snapshotted into every published
version (and its RewardModelUpdate), so a version always scores with its own normaliser.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class ScoreNormalizer:
    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0
    window: float = 10_000.0  # cap on count: older scores fade out
    clip: float = 5.0  # normalised scores are clipped to ±clip
    eps: float = 1e-6

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, raw: torch.Tensor) -> None:
        """Merge a batch of raw scores (Chan et al. 1979 parallel update)."""
        raw = raw.detach().double().reshape(-1)  # (N,)
        n = raw.numel()
        if n == 0:
            return
        b_mean = raw.mean().item()
        b_var = raw.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.var = m2 / total
        self.count = min(total, self.window)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw − mean) / std, clipped to ±clip; the identity (clipped) until a score was seen."""
        if self.count == 0:
            return raw.clamp(-self.clip, self.clip)
        return ((raw - self.mean) / (self.std + self.eps)).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, float]) -> "ScoreNormalizer":
        return cls(**state)
