"""The learner's objectives beside PPO (rlhf/ppo/group.py, dpo.py, offpolicy.py) on small
hand-computed cases, their wiring in PPOTrainer, their settings, and the intake that hands
the group objectives whole groups (rlhf/learner/intake.py) with exactly-once offsets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from rlhf.learner import LearnerState, PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import collate, group_index
from rlhf.learner.intake import GroupSizeError, RolloutIntake
from rlhf.ppo import (
    best_worst_pairs,
    broadcast_to_tokens,
    dpo_loss,
    grpo_advantages,
    policy_loss,
    rloo_advantages,
    sequence_logprobs,
    tis_weights,
)
from rlhf.ppo.group import GRPO_EPS

PAD = 2
NAN = float("nan")


# --- GRPO: A_i = (r_i − mean_g r) / (std_g r + eps) ------------------------------------------


def test_grpo_advantages_by_hand_over_non_adjacent_groups():
    # group 7: rewards 1, 2, 6 (rows 0, 2, 5) → mean 3, unbiased std sqrt(((−2)²+(−1)²+3²)/2) = sqrt(7)
    # group 3: rewards 4, 0 (rows 1, 4) → mean 2, std sqrt((2² + 2²)/1) = sqrt(8)
    # group 9: one reward (row 3) → no spread, advantage 0
    rewards = torch.tensor([1.0, 4.0, 2.0, 5.0, 0.0, 6.0])
    groups = torch.tensor([7, 3, 7, 9, 3, 7])
    adv, stats = grpo_advantages(rewards, groups)
    s7, s3 = math.sqrt(7), math.sqrt(8)
    expected = [
        -2 / (s7 + GRPO_EPS),
        2 / (s3 + GRPO_EPS),
        -1 / (s7 + GRPO_EPS),
        0.0,
        -2 / (s3 + GRPO_EPS),
        3 / (s7 + GRPO_EPS),
    ]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert stats["group_reward_std"].item() == pytest.approx((3 * s7 + 2 * s3 + 0) / 6, rel=1e-6)
    assert stats["groups_zero_std_ratio"].item() == pytest.approx(1 / 6)


def test_grpo_a_group_of_equal_rewards_teaches_nothing():
    adv, stats = grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3] > 0 > adv[4]
    assert stats["groups_zero_std_ratio"].item() == pytest.approx(3 / 5)


def test_grpo_advantages_are_invariant_to_shifting_and_scaling_a_group():
    r = torch.tensor([0.1, 0.9, 0.4, 0.3])
    g = torch.zeros(4, dtype=torch.long)
    a, _ = grpo_advantages(r, g, eps=0.0)
    b, _ = grpo_advantages(10 * r - 3, g, eps=0.0)
    assert torch.allclose(a, b, atol=1e-5)


# --- RLOO: A_i = r_i − mean_{j≠i} r_j --------------------------------------------------------


def test_rloo_advantages_by_hand():
    # group 0: 1, 2, 6 → baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    # group 1: 4, 0 → baselines 0, 4; group 2: alone → 0
    rewards = torch.tensor([1.0, 4.0, 2.0, 5.0, 0.0, 6.0])
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    adv, stats = rloo_advantages(rewards, groups)
    assert adv.tolist() == pytest.approx([1 - 4, 4 - 0, 2 - 3.5, 0.0, 0 - 4, 6 - 1.5])
    assert stats["rloo_baseline_mean"].item() == pytest.approx((4 + 0 + 3.5 + 0 + 4 + 1.5) / 6)
    # the equivalent form n/(n−1)·(r_i − mean): group 0 has n = 3, mean 3
    assert adv[[0, 2, 5]].tolist() == pytest.approx([1.5 * (1 - 3), 1.5 * (2 - 3), 1.5 * (6 - 3)])


def test_sequence_advantages_reach_every_response_token_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.float)  # ragged, a hole
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0, 0.5]), mask)
    assert out.tolist() == [[2.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]


# --- online DPO --------------------------------------------------------------------------------


def test_best_worst_pairs_one_per_group_ties_skipped():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.3, 0.3, 0.7, 0.1, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # group 1 a tie, group 3 alone
    assert best_worst_pairs(scores, groups).tolist() == [[1, 0], [5, 6]]
    assert best_worst_pairs(torch.tensor([1.0, 1.0]), torch.tensor([0, 0])).shape == (0, 2)


def test_dpo_loss_by_hand():
    # pair 1: (−3 − −4) − (−5 − −5) = 1 → z = 0.5; pair 2: (−2 − −1) − (−1 − −3) = −3 → z = −1.5
    chosen, rejected = torch.tensor([-3.0, -2.0], requires_grad=True), torch.tensor([-5.0, -1.0])
    chosen_ref, rejected_ref = torch.tensor([-4.0, -1.0]), torch.tensor([-5.0, -3.0])
    loss, stats = dpo_loss(chosen, rejected, chosen_ref, rejected_ref, beta=0.5)

    def nls(z):  # −log σ(z)
        return math.log1p(math.exp(-z))

    assert loss.item() == pytest.approx((nls(0.5) + nls(-1.5)) / 2)
    assert stats["dpo_reward_margin"].item() == pytest.approx(-0.5)
    assert stats["dpo_accuracy"].item() == 0.5
    assert stats["dpo_chosen_reward"].item() == pytest.approx((0.5 * 1 + 0.5 * -1) / 2)
    assert stats["dpo_rejected_reward"].item() == pytest.approx((0 + 0.5 * 2) / 2)
    loss.backward()
    # d/dc −log σ(β(c − …)) = −β·σ(−z)/P: raising the chosen log-prob lowers the loss
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731 - a formula
    assert chosen.grad.tolist() == pytest.approx([-0.5 * sigmoid(-0.5) / 2, -0.5 * sigmoid(1.5) / 2])


def test_dpo_loss_without_pairs_is_zero_with_grad():
    x = torch.zeros(0, requires_grad=True)
    loss, stats = dpo_loss(x, torch.zeros(0), torch.zeros(0), torch.zeros(0), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and stats["dpo_accuracy"].item() == 0.0


def test_sequence_logprobs_sum_only_response_tokens():
    lp = torch.tensor([[-1.0, -2.0, NAN], [-0.5, NAN, NAN]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sequence_logprobs(lp, mask).tolist() == [-3.0, -0.5]


# --- off-policy correction: w_t = min(π_prox/π_behav, C) -------------------------------------


def test_tis_weights_by_hand_truncated_and_nan_safe_on_padding():
    prox = torch.tensor([[-1.0, -1.0, -2.0], [-3.0, NAN, 0.0]])
    behav = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w, stats = tis_weights(prox, behav, mask, cap=2.0)
    # ratios e^0 = 1, e^1 = 2.718 → 2 (truncated), e^−1, e^−2.5; the padded NaN slot stays 0
    assert w.flatten().tolist() == pytest.approx([1.0, 2.0, math.exp(-1), math.exp(-2.5), 0.0, 0.0])
    assert stats["tis_truncated_ratio"].item() == pytest.approx(1 / 4)
    assert stats["tis_weight_mean"].item() == pytest.approx((1 + 2 + math.exp(-1) + math.exp(-2.5)) / 4)
    assert stats["logprob_mismatch"].item() == pytest.approx((0 + 1 + 1 + 2.5) / 4)
    assert not w.requires_grad


def test_policy_loss_token_weights_scale_each_token_and_none_is_plain_ppo():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.2], [-0.5, -1.0]])
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = torch.tensor([[0.5, 2.0], [1.0, 7.0]])
    plain, _ = policy_loss(logprobs, old, adv, mask, 0.2)
    ones, _ = policy_loss(logprobs, old, adv, mask, 0.2, token_weights=torch.ones(2, 2))
    weighted, _ = policy_loss(logprobs, old, adv, mask, 0.2, token_weights=weights)
    assert plain.item() == ones.item()
    # per token max(−Aρ, −A·clip(ρ)): ρ = 1, e^0.2 → clip 1.2, 1 (row 2's second is padding)
    per_token = [-1.0, max(math.exp(0.2), 1.2) * 1.0, -2.0]
    assert weighted.item() == pytest.approx((0.5 * per_token[0] + 2.0 * per_token[1] + 1.0 * per_token[2]) / 3)


# --- settings -------------------------------------------------------------------------------------


def test_settings_refuse_combinations_that_mean_nothing_and_name_the_fix():
    with pytest.raises(ValidationError, match="kl_in='loss' applies to objective grpo or rloo"):
        PPOConfig(kl_in="loss")
    with pytest.raises(ValidationError, match="needs old_logprobs='recompute'"):
        PPOConfig(off_policy_correction="tis", old_logprobs="rollout")
    with pytest.raises(ValidationError, match="online_dpo has none"):
        PPOConfig(objective="online_dpo", off_policy_correction="tis")
    with pytest.raises(ValidationError, match="tis_cap must be > 0"):
        PPOConfig(tis_cap=0)
    assert PPOConfig().objective == "ppo" and not PPOConfig().whole_groups
    assert PPOConfig(objective="grpo", kl_in="loss").whole_groups


# --- the trainer ----------------------------------------------------------------------------------


def group_rollout(i: int, group: str, score: float, response_len: int = 3, version: int = 0):
    g = torch.Generator().manual_seed(i)
    return SimpleNamespace(
        event_id=f"r{i}",
        prompt_token_ids=torch.randint(3, 1000, (3 + i % 3,), generator=g).tolist(),
        response_token_ids=torch.randint(3, 1000, (response_len + i % 2,), generator=g).tolist(),
        logprobs=(-torch.rand(response_len + i % 2, generator=g) * 8).tolist(),
        ref_logprobs=(-torch.rand(response_len + i % 2, generator=g) * 8).tolist(),
        score=score,
        policy_version=version,
        group_id=group,
        group_size=4,
    )


def grouped_rollouts():
    return [group_rollout(i, f"g{i // 4}", float(i % 4 == (i // 4))) for i in range(8)]


def small_config(**kw) -> PPOConfig:
    base = dict(batch_size=8, minibatch_size=4, micro_batch_size=4, ppo_epochs=2, lr=1e-3, finetune="full")
    return PPOConfig(**(base | kw))


def test_collate_numbers_groups_in_order_and_a_rollout_without_one_is_alone():
    rs = [SimpleNamespace(group_id=g) for g in ("b", "a", "b", "", "", "a")]
    assert group_index(rs).tolist() == [0, 1, 0, 2, 3, 1]


@pytest.mark.parametrize("objective,kw", [("grpo", {}), ("grpo", {"kl_in": "loss"}), ("rloo", {}), ("online_dpo", {})])
def test_group_objectives_train_the_policy_and_leave_the_value_head(tiny_model_dir, objective, kw):
    cfg = small_config(objective=objective, **kw)
    policy = build_policy(tiny_model_dir, cfg)
    head = {k: v.detach().clone() for k, v in policy.value_head.named_parameters()}
    lm = {k: v.detach().clone() for k, v in policy.causal_lm.named_parameters()}
    stats = PPOTrainer(policy, cfg).step(collate(grouped_rollouts(), PAD))
    assert all(torch.equal(v, dict(policy.value_head.named_parameters())[k]) for k, v in head.items())
    assert any(not torch.equal(v, dict(policy.causal_lm.named_parameters())[k]) for k, v in lm.items())
    assert "value_loss" not in stats and "explained_variance" not in stats
    assert stats["groups"] == 2.0
    if objective == "online_dpo":
        assert stats["dpo_pairs"] == 2.0 and stats["dpo_ties_skipped"] == 0.0 and stats["dpo_loss"] > 0
    else:
        assert ("kl_loss" in stats) == (kw.get("kl_in") == "loss")


def test_grpo_step_uses_the_group_advantages_of_the_kl_penalised_reward(tiny_model_dir):
    # one epoch, one minibatch: advantage_mean is the token mean of the broadcast advantages
    cfg = small_config(objective="grpo", ppo_epochs=1, minibatch_size=8, micro_batch_size=8)
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    batch = collate(grouped_rollouts(), PAD)
    with torch.no_grad():
        current, _, _ = trainer._behaviour_pass(batch)
    kl = ((current - batch.ref_logprobs) * batch.response_mask).sum(-1)
    expected, _ = grpo_advantages(batch.scores - cfg.kl_coef * kl, batch.group_ids)
    tokens = batch.response_mask.sum(-1)
    stats = trainer.step(batch)
    assert stats["advantage_mean"] == pytest.approx(float((expected * tokens).sum() / tokens.sum()), abs=1e-5)
    assert stats["reward_mean"] == pytest.approx(float((batch.scores - cfg.kl_coef * kl).mean()), abs=1e-5)


def test_online_dpo_on_a_batch_of_ties_takes_no_step(tiny_model_dir):
    cfg = small_config(objective="online_dpo")
    policy = build_policy(tiny_model_dir, cfg)
    before = {k: v.detach().clone() for k, v in policy.causal_lm.named_parameters()}
    rs = grouped_rollouts()
    for r in rs:
        r.score = 0.5
    stats = PPOTrainer(policy, cfg).step(collate(rs, PAD))
    assert stats["dpo_pairs"] == 0.0 and stats["dpo_ties_skipped"] == 2.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(v, dict(policy.causal_lm.named_parameters())[k]) for k, v in before.items())


def test_no_correction_is_todays_step_exactly(tiny_model_dir):
    results = []
    for cfg in (small_config(), small_config(off_policy_correction="none", objective="ppo", kl_in="reward")):
        policy = build_policy(tiny_model_dir, cfg)
        stats = PPOTrainer(policy, cfg).step(collate(grouped_rollouts(), PAD))
        results.append((stats["policy_loss"], {k: v.detach().clone() for k, v in policy.causal_lm.named_parameters()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


# --- intake: whole groups, exactly once ----------------------------------------------------------


def record(offset: int, group: str, size: int = 2, version: int = 0, **fields):
    event = SimpleNamespace(
        event_id=f"r{offset}",
        prompt_token_ids=[5, 6],
        response_token_ids=[8],
        logprobs=[-1.0],
        ref_logprobs=[-1.0],
        score=0.5,
        policy_version=version,
        group_id=group,
        group_size=size,
    )
    for k, v in fields.items():
        setattr(event, k, v)
    return SimpleNamespace(topic="t", partition=0, offset=offset, event=event)


def test_batches_are_whole_groups_even_when_groups_interleave():
    state = LearnerState()
    intake = RolloutIntake(state, batch_size=4, max_policy_lag=2, group_objective="grpo")
    intake.add([record(0, "a"), record(1, "b"), record(2, "c"), record(3, "b")])
    assert intake.take_batch() is None  # only b is complete
    intake.add([record(4, "c")])
    assert [r.offset for r in intake.take_batch()] == [1, 3, 2, 4]  # b then c: a still waits
    assert intake.safe_offsets() == {("t", 0): 0} and intake.handled_above() == {("t", 0): [1, 2, 3, 4]}
    intake.add([record(5, "a")])
    assert intake.take_batch() is None  # a alone is 2 of 4
    intake.add([record(6, "d"), record(7, "d")])
    assert [r.offset for r in intake.take_batch()] == [0, 5, 6, 7]
    assert intake.safe_offsets() == {("t", 0): 8} and intake.handled_above() == {}


def test_a_restart_from_the_checkpointed_offsets_trains_each_rollout_once():
    # b finishes before a: the checkpoint after b's step holds offset 0 and {1, 2} above it
    state = LearnerState()
    intake = RolloutIntake(state, batch_size=2, max_policy_lag=2, group_objective="rloo")
    intake.add([record(0, "a"), record(1, "b"), record(2, "b")])
    trained = [r.offset for r in intake.take_batch()]
    state.offsets, state.handled_above = intake.safe_offsets(), intake.handled_above()
    restored = LearnerState.from_json(state.to_json())
    assert restored.offsets == {("t", 0): 0} and restored.handled_above == {("t", 0): [1, 2]}
    # the restarted consumer reads from 0 again: 1 and 2 are skipped, a trains once
    again = RolloutIntake(restored, batch_size=2, max_policy_lag=2, group_objective="rloo")
    again.add([record(0, "a"), record(1, "b"), record(2, "b"), record(3, "a")])
    trained += [r.offset for r in again.take_batch()]
    assert sorted(trained) == [0, 1, 2, 3] and again.take_batch() is None
    assert again.safe_offsets() == {("t", 0): 4} and again.handled_above() == {}
    assert restored.rollouts_dropped_stale == restored.rollouts_invalid == 0  # skipped, not counted again


def test_a_group_that_loses_a_member_is_dropped_whole_and_counted():
    state = LearnerState()
    dead = []
    intake = RolloutIntake(
        state, batch_size=3, max_policy_lag=2, dead_letter=lambda rec, why: dead.append(why), group_objective="grpo"
    )
    intake.add(
        [
            record(0, "a", size=3),
            record(1, "a", size=3, logprobs=[NAN]),
            record(2, "a", size=3),
            record(3, "b", size=3),
            record(4, "b", size=3),
            record(5, "b", size=3, event_id="r4"),
        ]
    )
    assert dead == ["non_finite: logprobs[0] = nan", "duplicate: event_id r4 is already in group b"]
    assert len(intake) == 0 and intake.take_batch() is None
    assert intake.pop_dropped() == {
        "dropped_stale": [],
        "invalid": ["r1", "r4"],
        "failed": [],
        "incomplete_group": ["r0", "r2", "r3", "r4"],
    }
    assert state.rollouts_dropped_incomplete == 4 and state.rollouts_invalid == 2
    assert intake.safe_offsets() == {("t", 0): 6}


def test_a_rollout_without_a_group_is_refused_and_a_batch_size_groups_cannot_fill_stops_the_learner():
    dead = []
    intake = RolloutIntake(
        LearnerState(),
        batch_size=4,
        max_policy_lag=2,
        dead_letter=lambda rec, why: dead.append(why),
        group_objective="online_dpo",
    )
    intake.add([record(0, "", size=0)])
    assert dead == [
        "group: objective online_dpo trains on whole rollout groups: group_id '' and group_size 0 "
        "must be set (the rollout worker sets both)"
    ]
    with pytest.raises(
        GroupSizeError,
        match="batch_size 4 is not a multiple of the rollout group size 3.*"
        "RLHF_LEARNER_BATCH_SIZE to a multiple of 3, e.g. 3",
    ):
        intake.add([record(1, "a", size=3)])
    assert intake.safe_offsets() == {("t", 0): 1}  # the refused group is not handled: it waits for the fix


def test_a_waiting_group_that_goes_stale_is_dropped_as_stale():
    state = LearnerState(version=3, lineage=[0, 1, 2, 3])
    intake = RolloutIntake(state, batch_size=2, max_policy_lag=1, group_objective="grpo")
    intake.add([record(0, "a", version=3)])
    state.new_version()
    state.new_version()  # a's version now lags 2 > 1
    intake.add([record(1, "a", version=3), record(2, "b", version=5), record(3, "b", version=5)])
    assert [r.offset for r in intake.take_batch()] == [2, 3]
    assert intake.pop_dropped()["dropped_stale"] == ["r1", "r0"]
    assert intake.safe_offsets() == {("t", 0): 4}


def test_ppo_intake_is_unchanged_poll_order():
    intake = RolloutIntake(LearnerState(), batch_size=2, max_policy_lag=2)
    intake.add([record(0, "a"), record(1, "b"), record(2, "b"), record(3, "a")])
    assert [r.offset for r in intake.take_batch()] == [0, 1]
    assert intake.pop_dropped() == {"dropped_stale": [], "invalid": [], "failed": []}
