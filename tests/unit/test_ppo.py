"""rlhf.ppo: every formula on small hand-computed cases, plus the invariants PPO relies on."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

NAN = float("nan")
INF = float("inf")


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, atol=tol, rtol=tol)


def poison(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """values with every padded entry replaced by fill (NaN, inf, a huge number)."""
    return torch.where(mask.bool(), values, torch.full_like(values, fill))


@pytest.fixture
def ragged():
    """Three rows: right-padded, left-padded, and one with a hole in the middle."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]], dtype=torch.float32)
    return values, mask


def test_importable_without_grpc_or_kafka():
    code = (
        "import sys, rlhf.ppo\n"
        "bad = [m for m in sys.modules if m.startswith(('grpc', 'kafka', 'rlhf.v1'))]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- masked reductions -----------------------------------------------------------------


def test_masked_mean_hand_computed():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert close(masked_mean(values, mask), 7 / 3)
    assert close(masked_mean(values, mask, dim=1), [1.5, 4.0])
    assert close(masked_mean(values, mask, dim=0), [2.5, 2.0, 0.0])  # empty column → 0


def test_masked_var_hand_computed():
    values = torch.tensor([[1.0, 2.0, 99.0], [4.0, -7.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # picked 1, 2, 4: mean 7/3, squared deviations sum 42/9
    assert close(masked_var(values, mask, unbiased=False), 42 / 27)
    assert close(masked_var(values, mask, unbiased=True), 42 / 18)
    single = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert close(masked_var(values, single), 0.0)


def test_whiten_zero_mean_unit_variance_over_mask(ragged):
    values, mask = ragged
    values = 3.0 * values + 5.0
    white = masked_whiten(values, mask)
    assert close(masked_mean(white, mask), 0.0)
    assert close(masked_var(white, mask), 1.0, tol=1e-4)
    assert torch.all(white[mask == 0] == 0)


def test_whiten_without_shift_keeps_the_mean(ragged):
    values, mask = ragged
    values = 3.0 * values + 5.0
    white = masked_whiten(values, mask, shift_mean=False)
    assert close(masked_mean(white, mask), masked_mean(values, mask))
    assert close(masked_var(white, mask), 1.0, tol=1e-4)


@pytest.mark.parametrize("fill", [NAN, INF, -INF, 1e30])
def test_reductions_ignore_padded_values(ragged, fill):
    values, mask = ragged
    bad = poison(values, mask, fill)
    assert close(masked_mean(bad, mask), masked_mean(values, mask))
    assert close(masked_mean(bad, mask, dim=1), masked_mean(values, mask, dim=1))
    assert close(masked_var(bad, mask), masked_var(values, mask))
    assert close(masked_whiten(bad, mask), masked_whiten(values, mask))


# --- log-probs and entropy -------------------------------------------------------------


def test_logprobs_from_logits_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = (1/4, 3/4), (1/2, 1/2)
    labels = torch.tensor([[1, 0]])
    assert close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]])


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert close(logprobs_from_logits(logits, labels), expected)
    assert close(logprobs_from_logits(logits.bfloat16(), labels), expected, tol=0.1)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_entropy_from_logits():
    uniform = torch.zeros(1, 2, 8)
    assert close(entropy_from_logits(uniform), [[math.log(8)] * 2])
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert close(entropy_from_logits(peaked), [[0.0]], tol=1e-4)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 7, generator=g)
    p = torch.softmax(logits, -1)
    assert close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


# --- KL ---------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])  # ℓ = ln 2
    ln2 = math.log(2.0)
    assert close(kl_penalty(lp, ref, "k1"), [[ln2]])
    assert close(kl_penalty(lp, ref, "k2"), [[ln2**2 / 2]])
    assert close(kl_penalty(lp, ref, "k3"), [[0.5 - 1 + ln2]])
    assert close(kl_penalty(lp, ref), kl_penalty(lp, ref, "k1"))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k4")


def test_k2_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(3)
    lp, ref = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(lp, ref, "k2") >= 0)
    assert torch.all(kl_penalty(lp, lp, "k3") == 0)
    assert torch.all(kl_penalty(lp, lp, "k1") == 0)


def test_k1_and_k3_estimate_kl_on_sampled_tokens():
    g = torch.Generator().manual_seed(4)
    p_logits, q_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = (log_p.exp() * (log_p - log_q)).sum()
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=g)  # a ~ π
    lp, ref = log_p[samples].unsqueeze(0), log_q[samples].unsqueeze(0)
    assert close(kl_penalty(lp, ref, "k1").mean(), exact, tol=0.02)
    assert close(kl_penalty(lp, ref, "k3").mean(), exact, tol=0.02)


def test_kl_penalized_rewards_score_on_last_unmasked_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [-1.0] * 4])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-2.0, -1.0, -1.0, -3.0], [-1.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    expected = torch.tensor(
        [
            [-0.05, 0.0, 0.1 + 10.0, 0.0],  # k1 = 0.5, 0, −1; score at index 2
            [0.0, 0.0, 20.0, 0.0],  # left padding: last unmasked is index 2
            [0.0, 0.0, 0.0, 0.0],  # no response tokens: nothing to reward
        ]
    )
    assert close(rewards, expected)


def test_kl_penalized_rewards_equal_score_minus_beta_kl_in_sum(ragged):
    values, mask = ragged
    ref = values.flip(-1)
    scores = torch.tensor([1.0, -2.0, 0.5])
    for estimator in ("k1", "k2", "k3"):
        rewards = kl_penalized_rewards(scores, values, ref, mask, 0.2, estimator)
        kl_sum = (kl_penalty(values, ref, estimator) * mask).sum(-1)
        assert close(rewards.sum(-1), scores - 0.2 * kl_sum)
        assert torch.all(rewards[mask == 0] == 0)


def test_kl_penalized_rewards_ignore_padded_logprobs(ragged):
    values, mask = ragged
    ref = values.flip(-1)
    scores = torch.tensor([1.0, -2.0, 0.5])
    clean = kl_penalized_rewards(scores, values, ref, mask, 0.1, "k3")
    dirty = kl_penalized_rewards(scores, poison(values, mask, NAN), poison(ref, mask, -INF), mask, 0.1, "k3")
    assert close(dirty, clean)


# --- GAE --------------------------------------------------------------------------------


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # δ2 = 1 − 0.4 = 0.6; δ1 = 0.9·0.4 − 0.2 = 0.16; δ0 = 0.9·0.2 − 0.5 = −0.32
    # A2 = 0.6; A1 = 0.16 + 0.45·0.6 = 0.43; A0 = −0.32 + 0.45·0.43 = −0.1265
    assert close(adv, [[-0.1265, 0.43, 0.6]])
    assert close(ret, [[0.3735, 0.63, 1.0]])


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value(ragged):
    values, mask = ragged
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(3, 6, generator=g) * mask
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    assert close(adv * mask, (reward_to_go - values) * mask)
    assert close(ret * mask, reward_to_go * mask)


def test_gae_lambda_zero_is_one_step_td():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    assert close(adv, [[0.1 + 0.5 * 2 - 1, 0.2 + 0.5 * 3 - 2, 0.3 - 3]])


def test_gae_returns_are_advantages_plus_values_and_zero_on_padding(ragged):
    values, mask = ragged
    rewards = torch.ones_like(values)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert close(ret, (adv + values) * mask)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_skips_padding_like_the_compacted_sequence(ragged):
    values, mask = ragged
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(3, 6, generator=g)
    adv, ret = gae(poison(rewards, mask, NAN), poison(values, mask, INF), mask, gamma=0.9, lam=0.8)
    for row in range(3):
        keep = mask[row].bool()
        compact_adv, compact_ret = gae(
            rewards[row, keep][None], values[row, keep][None], torch.ones(1, int(keep.sum())), 0.9, 0.8
        )
        assert close(adv[row, keep], compact_adv[0])
        assert close(ret[row, keep], compact_ret[0])


# --- policy loss ------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(lp, lp, adv, mask, clip_eps=0.2)
    assert close(loss, -(1.0 - 2.0) / 2)
    assert close(stats["clipfrac"], 0.0) and close(stats["approx_kl"], 0.0)
    assert close(stats["ratio_mean"], 1.0)


def test_policy_loss_hand_computed_clipping():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # ρ
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(lp, old, adv, torch.ones(1, 4), clip_eps=0.2)
    # per token max(−Aρ, −A·clip(ρ)): A>0,ρ=1.5 → −1.2 (clipped); A<0,ρ=1.5 → 1.5;
    # A>0,ρ=0.5 → −0.5; A<0,ρ=0.5 → 0.8 (clipped)
    assert close(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert close(stats["clipfrac"], 0.5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5)) / 4
    assert close(stats["approx_kl"], expected_kl)
    assert close(stats["ratio_max"], 1.5)


@pytest.mark.parametrize(
    "ratio, advantage, has_grad",
    [
        (1.5, 1.0, False),  # above 1+ε, advantage positive: clipped, no push further
        (0.5, -1.0, False),  # below 1−ε, advantage negative: clipped
        (1.5, -1.0, True),  # above 1+ε but advantage negative: pull back, unclipped
        (0.5, 1.0, True),  # below 1−ε but advantage positive: unclipped
        (1.1, 1.0, True),  # inside the trust region
        (0.9, -1.0, True),
    ],
)
def test_clipping_stops_gradient_outside_trust_region(ratio, advantage, has_grad):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    loss.backward()
    if has_grad:
        assert close(lp.grad, [[-advantage * ratio]])  # d(−Aρ)/dlogπ = −Aρ
    else:
        assert lp.grad.abs().item() == 0.0


def test_policy_loss_padding_gets_no_gradient_and_no_influence(ragged):
    values, mask = ragged
    adv = values.flip(0)
    old = values.flip(-1) * 0.1
    lp = (values * 0.1).requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, 0.2)
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0)
    dirty_loss, dirty_stats = policy_loss(
        poison(values * 0.1, mask, NAN), poison(old, mask, INF), poison(adv, mask, NAN), mask, 0.2
    )
    assert close(dirty_loss, loss)
    for key in stats:
        assert close(dirty_stats[key], stats[key]), key


# --- value loss -------------------------------------------------------------------------


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5]])
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), clip_eps=0.2)
    # unclipped (0.25, 0.81, 2.25); clipped V = (0.2, 0.1, −0.2) → (0.64, 0.81, 1.44)
    assert close(loss, 0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert close(stats["value_clipfrac"], 1 / 3)
    assert close(stats["value_error"], (0.25 + 0.81 + 2.25) / 3)
    plain, _ = value_loss(values, old, returns, torch.ones(1, 3), clip_eps=None)
    assert close(plain, 0.5 * (0.25 + 0.81 + 2.25) / 3)


def test_value_loss_ignores_padding(ragged):
    values, mask = ragged
    old, returns = values * 0.5, values.flip(-1)
    v = values.clone().requires_grad_(True)
    loss, _ = value_loss(v, old, returns, mask, 0.2)
    loss.backward()
    assert torch.all(v.grad[mask == 0] == 0)
    dirty, _ = value_loss(poison(values, mask, NAN), poison(old, mask, INF), poison(returns, mask, NAN), mask, 0.2)
    assert close(dirty, loss)


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    assert close(explained_variance(returns, returns, mask), 1.0)
    assert close(explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)
    # residual (0, 0, −1): unbiased var 1/3; Var[returns] = 1 → 1 − 1/3
    assert close(explained_variance(torch.tensor([[1.0, 2.0, 4.0, 0.0]]), returns, mask), 2 / 3)
    assert torch.isnan(explained_variance(returns, torch.ones_like(returns), mask))


# --- KL controllers ---------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_as_documented():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.value == 0.1
    ctl.update(current_kl=6.0, n_steps=256)  # on target: unchanged
    assert close(ctl.value, 0.1)
    ctl.update(current_kl=6.6, n_steps=256)  # e = 0.1
    assert close(ctl.value, 0.1 * (1 + 0.1 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=600.0, n_steps=256)  # e clipped at +0.2
    assert close(ctl.value, before * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=256)  # e clipped at −0.2
    assert close(ctl.value, before * (1 - 0.2 * 256 / 10_000))


def test_adaptive_kl_controller_converges_direction_and_state_round_trip():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=100)
    for _ in range(20):
        ctl.update(5.0, n_steps=10)
    assert ctl.value > 0.05
    restored = AdaptiveKLController(0.05, target=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.2)
    assert ctl.update(100.0, 64) == 0.2 and ctl.value == 0.2
