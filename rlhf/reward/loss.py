"""Reward-model losses. Both return `(loss, stats)`; stats are detached 0-dim tensors.

Bradley-Terry (InstructGPT §3.5, Ouyang et al. 2022, eq. 1):
    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)),   loss = −log σ(r_w − r_l)
Pointwise logistic, for a thumbs rating that has no opposite rating to pair with:
    P(good | x, y) = σ(r(x, y)),                    loss = −log σ(s · r),  s = ±1
The pointwise term anchors the score's zero at "as likely up as down"; Bradley-Terry alone
is blind to a constant shift, which the normaliser removes anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean −log σ(r_w − r_l) over pairs.

    chosen    # (P,) r_φ(x, y_w), with grad
    rejected  # (P,) r_φ(x, y_l), with grad
    stats: bt_loss, bt_accuracy (share with r_w > r_l; ties count as wrong), bt_margin (mean r_w − r_l)
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must be equal (P,)")
    margin = chosen - rejected  # (P,)
    loss = -F.logsigmoid(margin).mean()  # logsigmoid is stable for large |margin|
    with torch.no_grad():
        stats = {
            "bt_loss": loss.detach(),
            "bt_accuracy": (margin > 0).float().mean(),
            "bt_margin": margin.mean(),
        }
    return loss, stats


def pointwise_logistic_loss(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean −log σ(s · r) over rated responses.

    scores  # (N,) r_φ(x, y), with grad
    labels  # (N,) +1 thumbs up, −1 thumbs down
    stats: point_loss, point_accuracy (share with sign(r) == s; r == 0 counts as wrong)
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be equal (N,)")
    signed = scores * labels.to(scores.dtype)  # (N,)
    loss = -F.logsigmoid(signed).mean()
    with torch.no_grad():
        stats = {"point_loss": loss.detach(), "point_accuracy": (signed > 0).float().mean()}
    return loss, stats
