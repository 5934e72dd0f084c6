"""Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
Control Using Generalized Advantage Estimation", eq. 16):

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
    A_t = Σ_l (γλ)^l · δ_{t+l}        computed backwards: A_t = δ_t + γλ·A_{t+1}
    R_t = A_t + V(s_t)                the value target

The episode is the response; V after its last token is 0 (the score arrives there).
"""

from __future__ import annotations

import torch

from rlhf.ppo.masked import zero_padding


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of the response tokens.

    rewards  # (B, T) per-token rewards (kl_penalized_rewards)
    values   # (B, T) V(s_t) from the critic at rollout time
    mask     # (B, T) 1 on response tokens
    returns  (advantages, returns), each (B, T), 0 where mask == 0

    Padded positions are skipped, not treated as zero-reward steps: the recursion carries
    A_{t+1} and V(s_{t+1}) across them, so any mask (right or left padding, holes) gives
    the same result as the compacted sequence, and padded values never enter.
    """
    keep = mask.bool()
    rewards = zero_padding(rewards, mask)
    values = zero_padding(values, mask)
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1})
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], advantage, torch.zeros_like(advantage))
    returns = zero_padding(advantages + values, mask)
    return advantages, returns
