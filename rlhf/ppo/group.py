"""Group-relative advantages: a prompt's n samples are each other's baseline, no critic.

Both take one score per response and the group it belongs to (the n samples of one
Generate(n) call, `Rollout.group_id`) and return one advantage per response; the trainer
broadcasts it to every response token (`broadcast_to_tokens`). Groups are given as integer
ids `(B,) long`, any values, rows of a group need not be adjacent.

  grpo_advantages  A_i = (r_i − mean_g r) / (std_g r + eps)
                   Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision)
  rloo_advantages  A_i = r_i − 1/(n−1) · Σ_{j≠i} r_j
                   Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
                   Optimization for Learning from Human Feedback in LLMs", eq. 6
"""

from __future__ import annotations

import torch

from rlhf.ppo.masked import zero_padding

GRPO_EPS = 1e-4  # DeepSeekMath does not give ε; TRL's GRPOTrainer uses 1e-4


def _group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (sum of its group's values, its group's size, row → group index).

    values     # (B,) float
    group_ids  # (B,) long, any ids
    returns    sums (B,), counts (B,), both gathered back to the rows, and inverse (B,)
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) in [0, G)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    return sums[inverse], counts[inverse], inverse


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = GRPO_EPS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A_i = (r_i − mean_g r) / (std_g r + eps), DeepSeekMath §4.1.2.

    rewards    # (B,) one per response (RM score, minus β·KL when KL is in the reward)
    group_ids  # (B,) long
    returns    advantages (B,), stats
    std is the unbiased (n−1) sample std of the group, as DeepSeekMath's released code and
    TRL (torch.std). A group of one has no spread: its advantage is 0, as is every
    advantage of a group whose rewards are all equal (nothing to prefer).
    stats: group_reward_std (mean over rows of their group's std), groups_zero_std_ratio
    (share of rows in groups with std 0: no learning signal from them)
    """
    sums, counts, inverse = _group_sums(rewards, group_ids)
    mean = sums / counts
    sq, _, _ = _group_sums((rewards - mean).square(), group_ids)
    std = torch.sqrt(sq / (counts - 1).clamp_min(1.0))  # (B,), 0 for a group of one
    advantages = (rewards - mean) / (std + eps)
    with torch.no_grad():
        stats = {
            "group_reward_std": std.mean(),
            "groups_zero_std_ratio": (std == 0).to(rewards.dtype).mean(),
        }
    return advantages, stats


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A_i = r_i − mean_{j≠i} r_j, Ahmadian et al. 2024 eq. 6 (leave-one-out baseline).

    rewards    # (B,) one per response
    group_ids  # (B,) long
    returns    advantages (B,), stats
    Equivalent form used here: n/(n−1)·(r_i − mean_g r). A group of one has no other
    sample to compare with: advantage 0.
    stats: rloo_baseline_mean (mean over rows of their leave-one-out baseline)
    """
    sums, counts, _ = _group_sums(rewards, group_ids)
    others = (counts - 1).clamp_min(1.0)
    baseline = (sums - rewards) / others  # (B,) mean of the other samples of the group
    advantages = torch.where(counts > 1, rewards - baseline, torch.zeros_like(rewards))
    with torch.no_grad():
        stats = {"rloo_baseline_mean": torch.where(counts > 1, baseline, torch.zeros_like(baseline)).mean()}
    return advantages, stats


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages → (B, T) on every response token, 0 on padding."""
    return zero_padding(advantages.unsqueeze(-1).expand(mask.shape), mask)
