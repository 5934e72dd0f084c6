"""KL estimators, the KL-penalised per-token reward, and the β controllers.

The objective is InstructGPT's stage 3: maximise E[r_φ(x, y)] − β·KL(π_θ ‖ π_ref).
KL is estimated per sampled token from ℓ_t = log π_θ(a_t|s_t) − log π_ref(a_t|s_t)
(Schulman, "Approximating KL divergence", 2020):

  k1 = ℓ                unbiased, can be negative per token
  k2 = ℓ² / 2           biased, low variance, ≥ 0
  k3 = e^(−ℓ) − 1 + ℓ   unbiased, low variance, ≥ 0

Sums over a sampled response of k1 (or k3) estimate the sequence KL(π_θ ‖ π_ref).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.ppo.masked import zero_padding

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL estimate.

    logprobs      # (B, T) log π_θ(a_t|s_t) of the sampled tokens
    ref_logprobs  # (B, T) log π_ref(a_t|s_t) of the same tokens
    returns       # (B, T) k1, k2 or k3 of ℓ = logprobs − ref_logprobs (not masked)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # (r − 1) − log r with r = π_ref/π_θ = e^(−ℓ)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last set entry of mask (0 for an all-zero row)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # 1..T
    return (mask.bool() * positions).argmax(-1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Per-token rewards r_t = −β·kl_t, plus the RM score at the last response token.

    scores        # (B,)   r_φ(x, y), one per response
    logprobs      # (B, T) log π_θ_old(a_t|s_t) from the rollout
    ref_logprobs  # (B, T) log π_ref(a_t|s_t)
    mask          # (B, T) 1 on response tokens
    returns       # (B, T) rewards, 0 on padding
    Ziegler et al. 2019 §2.2 / InstructGPT eq. 2; TRL and OpenRLHF place the score on the
    last response token (EOS or the truncation point) the same way. A row with no
    response tokens gets no reward at all.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator)  # (B, T)
    rewards = zero_padding(-kl_coef * kl, mask)
    has_tokens = mask.bool().any(-1)  # (B,)
    last = last_token_index(mask)  # (B,)
    score = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(-1, last.unsqueeze(-1), score.unsqueeze(-1))


class AdaptiveKLController:
    """Adaptive β, Ziegler et al. 2019 §2.2 ("Fine-Tuning Language Models from Human
    Preferences"), as in TRL's AdaptiveKLController:

        e = clip(KL / target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    KL above target raises β (pull back toward π_ref), below target lowers it. The
    proportional error is clipped so one noisy batch moves β at most 0.2·n/horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """current_kl: mean sequence KL of the batch; n_steps: samples (episodes) in it."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant β (Ziegler et al. 2019 also report fixed-β runs)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
