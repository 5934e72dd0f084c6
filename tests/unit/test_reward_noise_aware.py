"""The noise-aware Bradley-Terry (a label-flip term, Natarajan et al. 2013): the formula
against a hand computation, its bounded pull on a confidently contradicted pair, ε = 0 is
the plain loss, and the trainer setting reaches the loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.reward import TrainerConfig
from rlhf.reward.loss import bradley_terry_loss, noisy_log_sigmoid


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("eps", [0.05, 0.25, 0.4])
def test_loss_is_minus_log_of_eps_plus_scaled_sigmoid(eps):
    chosen, rejected = torch.tensor([2.0, -3.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.0, 1.5])
    loss, _ = bradley_terry_loss(chosen, rejected, label_noise=eps)
    margins = [2.0, -3.0, 0.0, -1.0]
    expected = sum(-math.log(eps + (1 - 2 * eps) * sigmoid(m)) for m in margins) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # weighted: the weighted mean of the same per-pair terms
    w = torch.tensor([1.0, 0.0, 3.0, 0.0])
    w_loss, _ = bradley_terry_loss(chosen, rejected, w, label_noise=eps)
    per = [-math.log(eps + (1 - 2 * eps) * sigmoid(m)) for m in margins]
    assert w_loss.item() == pytest.approx((per[0] + 3 * per[2]) / 4, rel=1e-5)


def test_zero_noise_is_the_plain_loss():
    chosen, rejected = torch.tensor([1.0, -2.0, 30.0]), torch.tensor([0.0, 1.0, -30.0])
    plain, _ = bradley_terry_loss(chosen, rejected)
    assert bradley_terry_loss(chosen, rejected, label_noise=0.0)[0].item() == plain.item()
    assert plain.item() == pytest.approx(sum(-math.log(sigmoid(m)) for m in (1.0, -3.0, 60.0)) / 3, rel=1e-5)


def test_a_confidently_contradicted_label_pulls_little_and_the_loss_is_bounded():
    """The point of the term: a pair the model ranks the other way by a wide margin (likely
    a flipped label) has a vanishing gradient and a loss ≤ −log ε; the plain loss grows
    without bound and pulls with slope 1."""
    eps = 0.25
    m = torch.tensor([-20.0], requires_grad=True)
    loss, _ = bradley_terry_loss(m, torch.zeros(1), label_noise=eps)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(eps + (1 - 2 * eps) * sigmoid(-20.0)), rel=1e-6)
    assert loss.item() <= -math.log(eps) + 1e-6
    assert abs(m.grad.item()) < 1e-6
    plain = torch.tensor([-20.0], requires_grad=True)
    bradley_terry_loss(plain, torch.zeros(1))[0].backward()
    assert plain.grad.item() == pytest.approx(-1.0, abs=1e-6)
    # near the decision boundary it still learns: slope (1 − 2ε) σ(0)(1 − σ(0)) / P = 0.25
    x = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(x, torch.zeros(1), label_noise=eps)[0].backward()
    assert x.grad.item() < -0.1


def test_stable_for_large_margins():
    out = noisy_log_sigmoid(torch.tensor([-1e4, 0.0, 1e4]), 0.1)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.log(0.1), rel=1e-6)
    assert out[2].item() == pytest.approx(math.log(0.9), rel=1e-6)


def test_the_setting_is_bounded_and_names_itself():
    assert TrainerConfig().label_noise == 0.0  # off by default
    assert TrainerConfig(label_noise=0.25).label_noise == 0.25
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_noise"):
            TrainerConfig(label_noise=bad)
    with pytest.raises(ValueError, match="label_noise"):
        noisy_log_sigmoid(torch.zeros(1), 0.5)
