"""Best-of-n distillation (RAFT / ReST, rlhf/ppo/distill.py) on hand-computed cases: which
response of each group is a target (ties, the threshold, groups of one), the NLL over
ragged masks, the settings, and its wiring in PPOTrainer alone (objective=best_of_n) and
beside grpo (distill=best_of_n) — the mixed step's gradient equals a direct computation."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY
from pydantic import ValidationError

from rlhf.learner import PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import collate
from rlhf.learner.metrics import observe_step
from rlhf.ppo import best_of_n_loss, best_of_n_targets, grpo_advantages, logprobs_from_logits, policy_loss
from tests.unit.test_objectives import PAD, group_rollout, small_config

NAN = float("nan")

# groups interleave; g0: 0.2 0.9 0.5 (mean 0.533) · g1: a tie 0.3 0.3 · g2: 0.7 0.1 · g3: one
# sample 0.7 · g4: 0.4 0.9 0.9, two equal tops (mean 0.733)
SCORES = torch.tensor([0.2, 0.3, 0.9, 0.7, 0.3, 0.5, 0.1, 0.7, 0.4, 0.9, 0.9])
GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 2, 3, 4, 4, 4])


def test_targets_default_the_top_of_each_group_above_its_mean():
    targets, stats = best_of_n_targets(SCORES, GROUPS)
    # g0 → row 2; g1 a tie (top = mean) → none; g2 → row 3; g3 alone (top = mean) → none;
    # g4 → row 9, the first of its two equal tops (row 10 is not trained twice)
    assert targets.nonzero().flatten().tolist() == [2, 3, 9]
    assert stats["distill_targets"].item() == 3
    assert stats["distill_groups_skipped"].item() == 2
    assert stats["distill_target_score_mean"].item() == pytest.approx((0.9 + 0.7 + 0.9) / 3)


def test_targets_with_an_absolute_threshold_strictly_above_it():
    # 0.8: only the 0.9 tops; 0.65: also g2's and lone g3's 0.7 (a group of one can teach
    # when the threshold is absolute); 0.7: strictly above, so the 0.7s are out again
    assert best_of_n_targets(SCORES, GROUPS, 0.8)[0].nonzero().flatten().tolist() == [2, 9]
    assert best_of_n_targets(SCORES, GROUPS, 0.65)[0].nonzero().flatten().tolist() == [2, 3, 7, 9]
    targets, stats = best_of_n_targets(SCORES, GROUPS, 0.7)
    assert targets.nonzero().flatten().tolist() == [2, 9] and stats["distill_groups_skipped"].item() == 3
    # the threshold is about the top only: g1's tie at 0.3 clears 0.0, its first row is the target
    assert best_of_n_targets(SCORES, GROUPS, 0.0)[0].nonzero().flatten().tolist() == [1, 2, 3, 7, 9]


def test_no_target_anywhere():
    targets, stats = best_of_n_targets(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 0, 0]))
    assert not targets.any()
    assert stats["distill_targets"].item() == 0 and stats["distill_target_score_mean"].item() == 0.0


def test_loss_is_the_token_mean_nll_of_the_targets_over_ragged_masks():
    logprobs = torch.tensor(
        [[-1.0, -2.0, NAN], [-0.5, NAN, NAN], [-3.0, -1.0, -2.0], [NAN, -4.0, 0.0]], requires_grad=True
    )
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # row 3 left-padded
    targets = torch.tensor([True, False, True, True])
    loss, stats = best_of_n_loss(logprobs, mask, targets)
    # target tokens: 1, 2 | 3, 1, 2 | 4, 0 → 13 / 7; row 1 is no target, NaNs sit in padding
    assert loss.item() == pytest.approx(13 / 7)
    assert stats["distill_loss"].item() == pytest.approx(13 / 7)
    loss.backward()
    expected = -mask * targets.unsqueeze(-1).float() / 7  # −1/7 on each target token, 0 elsewhere (no NaN)
    assert torch.allclose(logprobs.grad, expected)


def test_loss_without_targets_is_zero_with_grad():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = best_of_n_loss(logprobs, torch.ones(1, 2), torch.tensor([False]))
    loss.backward()
    assert loss.item() == 0.0 and logprobs.grad.abs().sum().item() == 0.0


def test_settings_for_distillation_refuse_what_means_nothing_and_name_the_fix():
    with pytest.raises(ValidationError, match="mixes with objective ppo, grpo or rloo, not 'online_dpo'"):
        PPOConfig(objective="online_dpo", distill="best_of_n")
    with pytest.raises(ValidationError, match="best_of_n has none"):
        PPOConfig(objective="best_of_n", off_policy_correction="tis")
    with pytest.raises(ValidationError, match="Adam's step ignores a loss's scale"):
        PPOConfig(objective="best_of_n", distill_coef=0.5)
    with pytest.raises(ValidationError, match="distill_coef must be > 0"):
        PPOConfig(objective="grpo", distill="best_of_n", distill_coef=0)
    with pytest.raises(ValidationError, match="kl_in='loss' applies to objective grpo or rloo"):
        PPOConfig(objective="best_of_n", kl_in="loss")
    assert PPOConfig(objective="best_of_n").whole_groups and PPOConfig(objective="best_of_n").distills
    assert PPOConfig(distill="best_of_n").whole_groups  # ppo picks each group's top too
    assert not PPOConfig().distills and not PPOConfig(objective="grpo").distills
    assert PPOConfig(objective="grpo", distill="best_of_n", off_policy_correction="tis").distills


# --- the trainer ----------------------------------------------------------------------------------


def rollouts(scores):
    """8 rollouts in two groups of 4 (rows 0-3, 4-7), ragged lengths."""
    return [group_rollout(i, f"g{i // 4}", s) for i, s in enumerate(scores)]


def snapshot(policy):
    return {k: v.detach().clone() for k, v in policy.causal_lm.named_parameters()}


def test_best_of_n_alone_trains_only_on_the_targets(tiny_model_dir):
    # group 0's top is row 2; group 1 a tie → no target. One epoch, one minibatch: the step's
    # distill_loss is row 2's NLL under the weights before it
    cfg = small_config(objective="best_of_n", ppo_epochs=1, minibatch_size=8, micro_batch_size=8)
    scores = [0.1, 0.2, 0.9, 0.3, 0.5, 0.5, 0.5, 0.5]
    batch = collate(rollouts(scores), PAD)
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    with torch.no_grad():
        current, _, _ = trainer._behaviour_pass(batch)
    row = batch.response_mask[2].bool()
    expected_nll = float(-current[2][row].mean())
    stats = trainer.step(batch)
    assert stats["distill_targets"] == 1.0 and stats["distill_groups_skipped"] == 1.0
    assert stats["distill_target_score_mean"] == pytest.approx(0.9)
    assert stats["distill_loss"] == pytest.approx(expected_nll, rel=1e-5)
    assert stats["grad_norm"] > 0 and "policy_loss" not in stats and "value_loss" not in stats
    observe_step(stats)  # the learner's stats → metrics path
    assert REGISTRY.get_sample_value("rlhf_learner_distill_targets") == 1.0
    assert REGISTRY.get_sample_value("rlhf_learner_distill_loss_nats") == pytest.approx(expected_nll, rel=1e-5)
    trained = snapshot(trainer.policy)

    # the other rows' tokens do not matter: other responses (same scores) give the same weights
    others = rollouts(scores)
    for i in (0, 1, 3, 4, 5, 6, 7):
        others[i] = group_rollout(100 + i, f"g{i // 4}", scores[i])
    again = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    again.step(collate(others, PAD))
    assert all(torch.equal(v, trained[k]) for k, v in snapshot(again.policy).items())


def test_best_of_n_without_a_target_takes_no_step(tiny_model_dir):
    cfg = small_config(objective="best_of_n")
    policy = build_policy(tiny_model_dir, cfg)
    before = snapshot(policy)
    stats = PPOTrainer(policy, cfg).step(collate(rollouts([0.5] * 8), PAD))
    assert stats["distill_targets"] == 0.0 and stats["distill_groups_skipped"] == 2.0
    assert stats["grad_norm"] == 0.0 and stats["distill_loss"] == 0.0
    assert all(torch.equal(v, dict(policy.causal_lm.named_parameters())[k]) for k, v in before.items())


@pytest.mark.parametrize("objective", ["ppo", "rloo"])
def test_distillation_beside_ppo_and_rloo(tiny_model_dir, objective):
    cfg = small_config(objective=objective, distill="best_of_n", distill_min_score=0.5)
    policy = build_policy(tiny_model_dir, cfg)
    head = {k: v.detach().clone() for k, v in policy.value_head.named_parameters()}
    stats = PPOTrainer(policy, cfg).step(collate(rollouts([0.1, 0.2, 0.9, 0.3, 0.4, 0.3, 0.2, 0.1]), PAD))
    # group 0's 0.9 clears 0.5, group 1's 0.4 does not
    assert stats["distill_targets"] == 1.0 and stats["distill_groups_skipped"] == 1.0 and stats["distill_loss"] > 0
    assert "policy_loss" in stats
    # ppo keeps training its critic beside the NLL; rloo leaves it
    trained_head = any(not torch.equal(v, dict(policy.value_head.named_parameters())[k]) for k, v in head.items())
    assert trained_head == (objective == "ppo") and ("value_loss" in stats) == (objective == "ppo")


def test_grpo_with_distillation_steps_on_the_sum_of_both_gradients(tiny_model_dir):
    # One epoch, one minibatch of 8 in micro-batches of 2 (so the target-token weighting
    # across micro-batches is exercised): the gradient the optimizer steps on equals
    # ∇[grpo surrogate (token mean) + distill_coef · NLL of rows 2 and 4 (target-token mean)]
    # computed on the whole batch at once. Clipping is off (max_grad_norm huge).
    coef = 0.7
    cfg = small_config(
        objective="grpo",
        distill="best_of_n",
        distill_coef=coef,
        ppo_epochs=1,
        minibatch_size=8,
        micro_batch_size=2,
        max_grad_norm=1e9,
    )
    scores = [0.1, 0.2, 0.9, 0.3, 0.8, 0.5, 0.5, 0.1]
    batch = collate(rollouts(scores), PAD)
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    params = list(trainer.policy.trainable_parameters())

    # the direct computation, on the weights before the step
    mask = batch.response_mask
    logits, _ = trainer._forward(batch)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    old = logprobs.detach()
    kl = ((old - batch.ref_logprobs) * mask).sum(-1)
    adv, _ = grpo_advantages(batch.scores - cfg.kl_coef * kl, batch.group_ids)
    surrogate, _ = policy_loss(logprobs, old, adv.unsqueeze(-1) * mask, mask, cfg.clip_eps)
    targets = torch.zeros(8, dtype=torch.bool)
    targets[[2, 4]] = True
    nll, _ = best_of_n_loss(logprobs, mask, targets)
    expected = torch.autograd.grad(surrogate + coef * nll, params, allow_unused=True, retain_graph=True)
    expected_nll = float(nll.detach())
    rl_only = torch.autograd.grad(surrogate, params, allow_unused=True, retain_graph=True)

    stepped = []  # the gradients each optimizer step sees (after clipping, which is off)
    trainer.optimizer.register_step_pre_hook(
        lambda *_: stepped.append([None if p.grad is None else p.grad.clone() for p in params])
    )
    stats = trainer.step(batch)
    assert len(stepped) == 1
    assert stats["distill_targets"] == 2.0 and stats["distill_loss"] == pytest.approx(expected_nll, rel=1e-5)
    for got, want in zip(stepped[0], expected):  # the value head has no gradient in either
        assert (got is None) == (want is None)
        assert want is None or torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    # and the distillation term is really in it: without it the gradient differs
    assert any(not torch.allclose(g, w, atol=1e-6, rtol=1e-4) for g, w in zip(rl_only, stepped[0]) if g is not None)
