"""The PPO surrogate and the clipped value loss (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", eq. 7 and §5), token-level means over the response mask as in
TRL's PPO trainer. Both return `(loss, stats)`; stats are detached 0-dim tensors so a
trainer can average them over minibatches and read them once per step.
"""

from __future__ import annotations

import torch

from rlhf.ppo.masked import masked_mean, zero_padding


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of w·max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)).

    logprobs      # (B, T) log π_θ(a_t|s_t), with grad
    old_logprobs  # (B, T) log π_θ_old(a_t|s_t) from the rollout
    advantages    # (B, T) (whitened) GAE advantages
    mask          # (B, T) 1 on response tokens
    token_weights # (B, T) detached per-token weights w (off-policy correction, rlhf.ppo.offpolicy
                  #        tis_weights); None: w = 1, the plain PPO surrogate
    stats: clipfrac  share of tokens where the clipped term is the active one
           approx_kl KL(π_old ‖ π_θ) by k3 = (ρ − 1) − log ρ (cleanrl's approx_kl)
           ratio_mean, ratio_max  of ρ = π_θ / π_old over the mask
    Taking the max (of losses) means a token whose ratio already left 1±ε in the
    direction the advantage favours contributes no gradient.
    """
    log_ratio = zero_padding(logprobs - old_logprobs, mask)  # (B, T), 0 on padding
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 · mean over tokens of max((V − R)², (V_clip − R)²).

    values      # (B, T) V_θ(s_t), with grad
    old_values  # (B, T) V_θ_old(s_t) from the rollout
    returns     # (B, T) GAE returns (targets)
    V_clip = V_old + clip(V − V_old, −ε_v, ε_v) (PPO2 baselines / TRL / OpenRLHF);
    clip_eps=None gives the plain squared error.
    stats: value_loss, value_clipfrac, value_mean, value_error (unclipped MSE)
    """
    unclipped = (values - returns).square()
    if clip_eps is None:
        per_token = unclipped
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns).square()
        per_token = torch.maximum(unclipped, clipped)
    loss = 0.5 * masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "value_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(values, mask),
            "value_error": masked_mean(unclipped, mask),
        }
    return loss, stats
