"""Online DPO: pairs from a rollout group ranked by the reward model, the DPO loss on them.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF): sample
responses from the current policy, let an annotator (here the RM's scores) pick the
better and the worse, and take a DPO step on that fresh pair. The loss is Rafailov et al.
2023, "Direct Preference Optimization", eq. 7:

    L = −log σ(β · [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])

with sequence log-probs summed over the response tokens. π_ref's come with the rollout
(the reference service); no critic, no clipping.

The same loss trains on users' own comparisons (the learner's user_feedback=dpo,
rlhf/learner/feedback_loss.py, π_ref in-process). Those pairs are off-policy, served by
any earlier version: the loss does not need on-policy pairs (it is the Bradley-Terry
likelihood of the observed choice under the reward π_θ/π_ref implies, for any two
responses, with no importance ratio); OAIF's on-policy sampling buys a fresher signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.ppo.masked import masked_sum


def best_worst_pairs(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """One (chosen, rejected) pair per group: its highest and its lowest RM score.

    scores     # (B,) RM scores
    group_ids  # (B,) long
    returns    # (P, 2) long row indices [chosen, rejected], groups in order of first row;
               a group whose best and worst scores are equal (a tie, or a group of one)
               gives no pair: the RM prefers nothing there. Among equal best (worst)
               scores the first row is taken.
    """
    pairs = []
    seen: dict[int, list[int]] = {}
    for row, g in enumerate(group_ids.tolist()):
        seen.setdefault(g, []).append(row)
    for rows in seen.values():
        s = scores[rows]
        best, worst = rows[int(s.argmax())], rows[int(s.argmin())]
        if scores[best] > scores[worst]:
            pairs.append((best, worst))
    return torch.tensor(pairs, dtype=torch.long, device=scores.device).reshape(-1, 2)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token log-probs → (B,) log-prob of each response (sum over its tokens)."""
    return masked_sum(logprobs, mask, dim=-1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_ref_logps: torch.Tensor,
    rejected_ref_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over pairs of −log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]).

    chosen_logps, rejected_logps          # (P,) log π_θ(y|x), with grad
    chosen_ref_logps, rejected_ref_logps  # (P,) log π_ref(y|x)
    Rafailov et al. 2023 eq. 7. −log σ(z) is F.logsigmoid's negation (stable for any z).
    No pairs gives a loss of 0 (with grad), so a batch of ties is a no-op step.
    stats: dpo_loss, dpo_reward_margin (mean β·[…], the implicit reward's margin, nats),
           dpo_accuracy (share of pairs with a positive margin), dpo_chosen_reward and
           dpo_rejected_reward (mean β·(log π_θ − log π_ref) of each side, nats)
    """
    chosen_rewards = beta * (chosen_logps - chosen_ref_logps)  # (P,)
    rejected_rewards = beta * (rejected_logps - rejected_ref_logps)  # (P,)
    margin = chosen_rewards - rejected_rewards  # (P,)
    per_pair = -F.logsigmoid(margin)
    loss = per_pair.mean() if per_pair.numel() else margin.sum() * 0.0
    with torch.no_grad():

        def mean(x: torch.Tensor) -> torch.Tensor:
            return x.mean() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)

        stats = {
            "dpo_loss": loss.detach(),
            "dpo_reward_margin": mean(margin),
            "dpo_accuracy": mean((margin > 0).to(margin.dtype)),
            "dpo_chosen_reward": mean(chosen_rewards),
            "dpo_rejected_reward": mean(rejected_rewards),
        }
    return loss, stats
