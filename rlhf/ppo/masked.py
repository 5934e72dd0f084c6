"""Masked reductions and per-token quantities from logits.

Every tensor is `(B, T)` over response tokens unless said otherwise; `mask` is 1 on real
response tokens and 0 on padding. Padded entries are selected away with `torch.where`
rather than multiplied by zero, so a NaN or inf in a padded slot cannot leak into a
result (0 · inf = NaN). Conventions follow TRL's `core.py` (masked_mean / masked_var /
masked_whiten), with the whitened output zeroed on padding.
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8


def zero_padding(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values where mask is set, 0 elsewhere (NaN-safe, unlike values * mask)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values over the set entries of mask (over dim, or over everything)."""
    picked = zero_padding(values, mask)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values over the set entries of mask.

    values, mask  # (B, T); dim=None → scalar, dim=k → reduced over k.
    An empty selection (no set entries) gives 0, not NaN: a batch of empty responses has
    nothing to learn from, and 0 keeps it out of the gradient.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values over the set entries of mask (a scalar).

    unbiased applies Bessel's correction n / (n - 1) with n the number of set entries;
    with n ≤ 1 there is no spread to measure and the result is 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), torch.zeros_like(var))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean) / std over the set entries of mask; 0 on padding.

    With shift_mean=False the mean is added back (only the scale changes), which is how
    TRL whitens rewards. The std uses the unbiased variance, so the result has unit
    unbiased variance over the mask.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] without materialising the (B, T, V) log-softmax.

    logits  # (B, T, V) scores for the token at each position
    labels  # (B, T)    the token ids taken
    returns # (B, T)    log π(labels_t | s_t), float32 (upcast from bf16/fp16 logits)
    gather − logsumexp keeps one V-sized temporary instead of two (OpenRLHF does the same).
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy H(π(·|s_t)) = logsumexp(z) − Σ softmax(z)·z.

    logits  # (B, T, V) → returns (B, T), float32
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over the mask (a scalar).

    1 is a perfect critic, 0 no better than a constant, negative worse than one. NaN when
    the returns have no variance (nothing to explain), as in cleanrl / SB3.
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns.clamp_min(1e-30), nan)
