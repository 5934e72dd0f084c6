"""Best-of-n distillation: each group's top-ranked sample by RM score becomes a supervised target.

RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model
Alignment", Alg. 1): sample n responses per prompt, keep the one the reward model ranks
highest, fine-tune on it with the ordinary language-model loss. ReST (Gulcehre et al.
2023, "Reinforced Self-Training for Language Modeling", §2) is the same Grow/Improve loop
with a reward threshold: a sample is a target only if its reward clears it. Here the loop
is online (a batch is a few fresh groups, not a data set), so one learner step is one
Improve step on the newest Grow.

Why it helps with a rare behaviour: a policy-gradient advantage of a rare good sample is
one token-level nudge among n, and is whitened or shared with the group; as a supervised
target the sample's every token gets the full log-likelihood gradient, epoch after epoch.
The threshold is what keeps a group where nothing is good from teaching anything: by
default the top sample must score above its group's mean, so a group of equal scores (or
of one sample) contributes no target.

  best_of_n_targets  (B,) bool: the rows that are targets (one per group at most)
  best_of_n_loss     masked mean NLL over the targets' response tokens → (loss, stats)
"""

from __future__ import annotations

import torch

from rlhf.ppo.masked import masked_mean


def best_of_n_targets(
    scores: torch.Tensor, group_ids: torch.Tensor, min_score: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which rows are distillation targets: per group its highest RM score, if that clears the threshold.

    scores     # (B,) RM scores
    group_ids  # (B,) long, any ids, rows of a group need not be adjacent
    min_score  None: the top score must be strictly above its group's mean (a group of
               equal scores, or of one, gives no target); a number: strictly above it
    returns    targets (B,) bool, at most one True per group; among equal top scores the
               first row is taken (as best_worst_pairs), so a tie is not trained twice.
    stats: distill_targets (rows selected), distill_groups_skipped (groups whose top did
           not clear the threshold), distill_target_score_mean (mean RM score of the
           targets; 0 without any)
    """
    targets = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    rows_of: dict[int, list[int]] = {}
    for row, g in enumerate(group_ids.tolist()):
        rows_of.setdefault(g, []).append(row)
    skipped = 0
    for rows in rows_of.values():
        s = scores[rows]
        top = rows[int(s.argmax())]  # argmax returns the first of equal maxima
        threshold = s.mean() if min_score is None else torch.as_tensor(min_score, dtype=s.dtype)
        if scores[top] > threshold:
            targets[top] = True
        else:
            skipped += 1
    with torch.no_grad():
        picked = scores[targets]
        stats = {
            "distill_targets": targets.sum().to(scores.dtype),
            "distill_groups_skipped": torch.tensor(float(skipped), dtype=scores.dtype),
            "distill_target_score_mean": picked.mean() if picked.numel() else torch.zeros((), dtype=scores.dtype),
        }
    return targets, stats


def best_of_n_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−mean log π_θ over the response tokens of the target rows (RAFT/ReST's fine-tuning loss).

    logprobs  # (B, T) log π_θ(y_t | x, y_<t), with grad
    mask      # (B, T) 1 on real response tokens
    targets   # (B,) bool, from best_of_n_targets
    A token mean, like the rest of the learner's losses, so a long target weighs as its
    tokens do. No target gives a loss of 0 (with grad): a step with nothing good to copy
    is a no-op for this term. NaN or inf in a padded slot or a non-target row stays out.
    stats: distill_loss (the NLL, nats per target token)
    """
    token_mask = mask * targets.unsqueeze(-1).to(mask.dtype)  # (B, T)
    loss = masked_mean(-logprobs, token_mask)
    return loss, {"distill_loss": loss.detach()}
