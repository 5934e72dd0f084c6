"""Reward-model losses. Both return `(loss, stats)`; stats are detached 0-dim tensors.

Bradley-Terry (InstructGPT §3.5, Ouyang et al. 2022, eq. 1):
    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)),   loss = −log σ(r_w − r_l)
Pointwise logistic, for a thumbs rating that has no opposite rating to pair with:
    P(good | x, y) = σ(r(x, y)),                    loss = −log σ(s · r),  s = ±1
The pointwise term anchors the score's zero at "as likely up as down"; Bradley-Terry alone
is blind to a constant shift, which the normaliser removes anyway.
Ties, two answers judged equally good, are Bradley-Terry pairs with target ½ (the
cross-entropy of σ(r_a − r_b) against ½; minimal at r_a = r_b):
    loss = −½ log σ(r_a − r_b) − ½ log σ(r_b − r_a)
Noise-aware Bradley-Terry (a label-flip term): if each comparison label is flipped with
probability ε, independently of the answers (the class-conditional noise model of Natarajan
et al. 2013, "Learning with Noisy Labels"), the label's likelihood is
    P(label a ≻ b) = ε + (1 − 2ε) σ(r_a − r_b),     loss = −log(ε + (1 − 2ε) σ(r_w − r_l))
Its gradient vanishes for a pair the model confidently ranks the other way (the loss is
bounded by −log ε), so a flipped label cannot pull the scores without limit. ε = 0 is the
plain loss. Ties are left as they are (a flip of a tie is a tie).
Every loss takes optional per-example weights (the raters' reliability,
rlhf/reward/reliability.py) and is then the weighted mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) values, weighted when `weights` (N,) are given (0 when they sum to 0)."""
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match {tuple(values.shape)}")
    w = weights.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1e-12)


def noisy_log_sigmoid(margin: torch.Tensor, label_noise: float) -> torch.Tensor:
    """log(ε + (1 − 2ε) σ(margin)), computed stably (log-sum-exp of log ε and
    log(1 − 2ε) + log σ(margin)); log σ(margin) itself when ε = 0."""
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise={label_noise}: must be in [0, 0.5)")
    if label_noise == 0.0:
        return F.logsigmoid(margin)
    return torch.logaddexp(
        torch.full_like(margin, math.log(label_noise)), math.log1p(-2 * label_noise) + F.logsigmoid(margin)
    )


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None, label_noise: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean −log σ(r_w − r_l) over pairs (weighted by `weights` (P,) if given); with
    `label_noise` ε > 0 the noise-aware −log(ε + (1 − 2ε) σ(r_w − r_l)).

    chosen    # (P,) r_φ(x, y_w), with grad
    rejected  # (P,) r_φ(x, y_l), with grad
    stats: bt_loss, bt_accuracy (share with r_w > r_l; ties count as wrong), bt_margin (mean r_w − r_l)
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must be equal (P,)")
    margin = chosen - rejected  # (P,)
    loss = _mean(-noisy_log_sigmoid(margin, label_noise), weights)  # stable for large |margin|
    with torch.no_grad():
        stats = {
            "bt_loss": loss.detach(),
            "bt_accuracy": (margin > 0).float().mean(),
            "bt_margin": margin.mean(),
        }
    return loss, stats


def tie_loss(
    a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean −½ log σ(r_a − r_b) − ½ log σ(r_b − r_a) over tied pairs: Bradley-Terry with target ½.

    a, b  # (T,) the two answers' scores, with grad
    stats: tie_loss, tie_gap (mean |r_a − r_b|)
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be equal (T,)")
    margin = a - b  # (T,)
    loss = _mean(-0.5 * (F.logsigmoid(margin) + F.logsigmoid(-margin)), weights)
    with torch.no_grad():
        stats = {"tie_loss": loss.detach(), "tie_gap": margin.abs().mean()}
    return loss, stats


def pointwise_logistic_loss(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean −log σ(s · r) over rated responses (weighted by `weights` (N,) if given).

    scores  # (N,) r_φ(x, y), with grad
    labels  # (N,) +1 thumbs up, −1 thumbs down
    stats: point_loss, point_accuracy (share with sign(r) == s; r == 0 counts as wrong)
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be equal (N,)")
    signed = scores * labels.to(scores.dtype)  # (N,)
    loss = _mean(-F.logsigmoid(signed), weights)
    with torch.no_grad():
        stats = {"point_loss": loss.detach(), "point_accuracy": (signed > 0).float().mean()}
    return loss, stats


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two (N,) tensors, differentiable; 0 when either is constant
    (a batch of equal lengths carries no length signal to decorrelate)."""
    da, db = a - a.mean(), b - b.mean()
    return (da * db).sum() / (da.norm() * db.norm()).clamp(min=eps)


def odin_disentangle_loss(
    quality: torch.Tensor,
    length_score: torch.Tensor,
    lengths: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
    length_weight: float = 1.0,
    ortho_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ODIN's disentangling terms (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates
    Hacking in RLHF", §4): the RM has a quality head r_Q and a length head r_L on one
    backbone; the ranking loss (Bradley-Terry) is taken on r_Q + r_L, and these terms make
    r_L carry the length and r_Q not:

        L_length = |ρ(r_Q, L)| − ρ(r_L, L)        ρ: Pearson correlation over the batch
        L_ortho  = |w_Q · w_L|                    the two heads' weight vectors
        loss     = length_weight · L_length + ortho_weight · L_ortho

    The policy is then scored with r_Q alone.

    quality       # (N,) r_Q of every text in the batch, with grad
    length_score  # (N,) r_L of the same texts, with grad
    lengths       # (N,) their lengths (words or tokens: ρ does not care about the unit)
    w_quality     # (H,) quality head weight
    w_length      # (H,) length head weight
    stats: odin_loss, odin_quality_length_corr ρ(r_Q, L), odin_length_head_corr ρ(r_L, L), odin_ortho
    """
    if not (quality.shape == length_score.shape == lengths.shape) or quality.dim() != 1:
        raise ValueError(
            f"quality {tuple(quality.shape)}, length_score {tuple(length_score.shape)} and "
            f"lengths {tuple(lengths.shape)} must be equal (N,)"
        )
    if w_quality.shape != w_length.shape or w_quality.dim() != 1:
        raise ValueError(f"w_quality {tuple(w_quality.shape)} and w_length {tuple(w_length.shape)} must be equal (H,)")
    lengths = lengths.to(quality.dtype)
    rho_q = pearson(quality, lengths)
    rho_l = pearson(length_score, lengths)
    ortho = (w_quality * w_length).sum().abs()
    loss = length_weight * (rho_q.abs() - rho_l) + ortho_weight * ortho
    with torch.no_grad():
        stats = {
            "odin_loss": loss.detach(),
            "odin_quality_length_corr": rho_q.detach(),
            "odin_length_head_corr": rho_l.detach(),
            "odin_ortho": ortho.detach(),
        }
    return loss, stats
