"""What each consumer refuses, rule by rule: every rule has an event that breaks it and
one that passes. The learner's rollouts (rlhf.learner.batch / intake), the reward
service's feedback (rlhf.reward.data) and the rollout worker's live prompts
(rlhf.rollout.sources); and a PPO step that fails is undone (rlhf.learner.trainer)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from rlhf.learner import LearnerState, PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import MAX_ABS_SCORE, MIN_LOGPROB, RolloutLimits, collate, invalid_reason
from rlhf.learner.intake import RolloutIntake
from rlhf.learner.trainer import NonFiniteStep
from rlhf.models import load_causal_lm
from rlhf.reward.data import FeedbackConverter, FeedbackLimits, feedback_problem
from rlhf.rollout.sources import live_prompt_problem
from rlhf.v1 import common_pb2, events_pb2

PAD = 2
LIMITS = RolloutLimits(vocab_size=1000, max_length=16)


def rollout(**fields):
    base = dict(
        event_id="r0",
        prompt_token_ids=[5, 6, 7],
        response_token_ids=[8, 9],
        logprobs=[-1.0, -2.0],
        ref_logprobs=[-1.5, -0.5],
        score=0.5,
        policy_version=0,
    )
    return SimpleNamespace(**(base | fields))


def reason(r, limits=LIMITS) -> str | None:
    found = invalid_reason(r, limits)
    return None if found is None else found.reason


# --- the learner's rollouts: batch.invalid_reason ----------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, None),
        ({"prompt_token_ids": []}, "empty"),
        ({"response_token_ids": [], "logprobs": [], "ref_logprobs": []}, "empty"),
        ({"logprobs": [-1.0]}, "lengths"),
        ({"ref_logprobs": [-1.0, -1.0, -1.0]}, "lengths"),
        ({"prompt_token_ids": [1, 2, 10_000_000]}, "token_id"),  # the crash-looping rollout
        ({"prompt_token_ids": [0, 999]}, None),  # both ends of [0, vocab_size)
        ({"response_token_ids": [8, 1000]}, "token_id"),
        ({"response_token_ids": [-1, 9]}, "token_id"),
        ({"prompt_token_ids": [5] * 14}, None),  # 14 + 2 = max_length
        ({"prompt_token_ids": [5] * 15}, "too_long"),
        ({"logprobs": [-1.0, math.nan]}, "non_finite"),
        ({"ref_logprobs": [-math.inf, -1.0]}, "non_finite"),
        ({"logprobs": [0.0, 1e-4]}, None),  # float rounding above 0 is tolerated
        ({"logprobs": [-1.0, 0.5]}, "out_of_range"),
        ({"ref_logprobs": [MIN_LOGPROB, -1.0]}, None),
        ({"ref_logprobs": [MIN_LOGPROB * 2, -1.0]}, "out_of_range"),
        ({"score": math.nan}, "non_finite"),
        ({"score": math.inf}, "non_finite"),
        ({"score": -MAX_ABS_SCORE}, None),
        ({"score": 1e30}, "out_of_range"),  # finite, but PPO's squares overflow
    ],
)
def test_each_rollout_rule(fields, expected):
    assert reason(rollout(**fields)) == expected


def test_reasons_name_the_field_and_the_limit():
    found = invalid_reason(rollout(prompt_token_ids=[1, 2, 10_000_000]), LIMITS)
    assert str(found) == "token_id: prompt_token_ids[2] = 10000000 is outside the policy's vocabulary [0, 1000)"
    assert "max_position_embeddings 16" in str(invalid_reason(rollout(prompt_token_ids=[5] * 15), LIMITS))


def test_without_limits_only_shape_and_values_are_checked():
    assert reason(rollout(prompt_token_ids=[10_000_000] * 40), limits=None) is None
    assert reason(rollout(score=math.nan), limits=None) == "non_finite"


def test_limits_are_the_models_embedding_rows_and_positions(tiny_model_dir):
    lm = load_causal_lm(tiny_model_dir)
    limits = RolloutLimits.of(lm)
    assert limits.vocab_size == lm.get_input_embeddings().weight.shape[0] == lm.config.vocab_size
    assert limits.max_length == lm.config.max_position_embeddings


# --- the learner's intake: versions, dead letters, offsets --------------------------------


def record(offset: int, **fields):
    return SimpleNamespace(topic="t", partition=0, offset=offset, event=rollout(event_id=f"r{offset}", **fields))


def invalid_count(why: str) -> float:
    return REGISTRY.get_sample_value("rlhf_learner_rollouts_invalid_total", {"reason": why}) or 0.0


def test_a_version_never_given_out_is_invalid_an_old_one_only_stale():
    state = LearnerState(version=2, lineage=[0, 1, 2])
    dead: list[tuple[int, str]] = []
    intake = RolloutIntake(
        state,
        batch_size=2,
        max_policy_lag=1,
        limits=LIMITS,
        dead_letter=lambda rec, why: dead.append((rec.offset, why)),
    )
    before = invalid_count("version")
    intake.add(
        [
            record(0, policy_version=999_999),
            record(1, policy_version=-1),
            record(2, policy_version=0),
            record(3, policy_version=2),
            record(4, policy_version=1),
        ]
    )
    assert [off for off, _ in dead] == [0, 1]
    assert dead[0][1] == "version: policy_version 999999 was never given out by this learner (latest 2)"
    assert (state.rollouts_invalid, state.rollouts_dropped_stale) == (2, 1)  # version 0 lags 2 > 1: stale
    assert invalid_count("version") == before + 2
    assert [r.offset for r in intake.take_batch()] == [3, 4]
    assert intake.safe_offsets() == {("t", 0): 5}  # dead-lettered and stale records count as handled
    assert intake.pop_dropped() == {"dropped_stale": ["r2"], "invalid": ["r0", "r1"], "failed": []}


def test_an_invalid_rollout_is_dead_lettered_before_it_counts_as_handled():
    state = LearnerState()

    def refuse(rec, why):
        raise RuntimeError("broker gone")

    intake = RolloutIntake(state, batch_size=1, max_policy_lag=1, limits=LIMITS, dead_letter=refuse)
    intake.add([record(0)])
    with pytest.raises(RuntimeError, match="broker gone"):
        intake.add([record(1, prompt_token_ids=[1, 2, 10_000_000])])
    assert intake.take_batch()[0].offset == 0
    assert intake.safe_offsets() == {("t", 0): 1}  # not past the rollout that is not yet on the DLQ
    assert state.rollouts_invalid == 0


def test_a_failed_batch_is_counted_and_listed_for_the_ledger():
    state = LearnerState()
    intake = RolloutIntake(state, batch_size=2, max_policy_lag=1)
    intake.add([record(0), record(1)])
    intake.record_failed(intake.take_batch())
    assert (state.rollouts_failed, state.steps_failed) == (2, 1)
    assert intake.pop_dropped()["failed"] == ["r0", "r1"]
    assert LearnerState.from_json(state.to_json()).rollouts_failed == 2
    assert LearnerState.from_json({"step": 3}).steps_failed == 0  # a checkpoint from before these counters


# --- a PPO step is all or nothing ------------------------------------------------------------


def batch_of(seed: int, **fields):
    g = torch.Generator().manual_seed(seed)
    return [
        rollout(
            event_id=f"r{seed}-{i}",
            prompt_token_ids=torch.randint(3, 1000, (3 + i % 3,), generator=g).tolist(),
            response_token_ids=torch.randint(3, 1000, (2,), generator=g).tolist(),
            **({"score": float(i % 2)} | fields),
        )
        for i in range(4)
    ]


def trainer_for(tiny_model_dir, finetune: str) -> PPOTrainer:
    cfg = PPOConfig(batch_size=4, minibatch_size=2, micro_batch_size=2, ppo_epochs=2, lr=1e-3, finetune=finetune)
    return PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)


def weights(trainer: PPOTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.policy.trainable_parameters()]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_step_that_raises_changes_nothing(tiny_model_dir, finetune):
    """A: good, failing, good. B: good, good. Same weights, moments, β and shuffle after."""
    a, b = trainer_for(tiny_model_dir, finetune), trainer_for(tiny_model_dir, finetune)
    for t in (a, b):
        t.step(collate(batch_of(1), PAD))
    before = weights(a)
    oov = batch_of(2)
    oov[1].prompt_token_ids = [1, 2, 10_000_000]  # what validation catches; here it reaches the model
    with pytest.raises(IndexError):
        a.step(collate(oov, PAD))
    assert all(torch.equal(x, y) for x, y in zip(before, weights(a)))
    assert a.steps == 1
    for t in (a, b):
        t.step(collate(batch_of(3), PAD))
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))
    assert a.kl_ctl.value == b.kl_ctl.value and a.scheduler.last_epoch == b.scheduler.last_epoch
    moments = lambda t: [s["exp_avg"] for s in t.optimizer.state.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))


def test_a_step_that_goes_non_finite_is_undone(tiny_model_dir):
    trainer = trainer_for(tiny_model_dir, "full")
    before = weights(trainer)
    beta = trainer.kl_ctl.value
    # finite scores that validation refuses (collate too), set past it: the value loss
    # squares them beyond float32
    batch = collate(batch_of(4), PAD)
    batch.scores = torch.full_like(batch.scores, 1e30)
    with pytest.raises(NonFiniteStep, match="value_loss"):
        trainer.step(batch)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(trainer)))
    assert trainer.kl_ctl.value == beta and trainer.steps == 0 and not trainer.optimizer.state
    stats = trainer.step(collate(batch_of(5), PAD))  # and it still trains
    assert math.isfinite(stats["value_loss"]) and trainer.steps == 1


# --- the reward service's feedback: data.feedback_problem --------------------------------------

TEXT_LIMITS = FeedbackLimits(max_prompt_chars=10, max_response_chars=8)


def feedback(prompt=("user", "hi"), **kind) -> events_pb2.Feedback:
    messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in ([prompt] if prompt else [])]
    return events_pb2.Feedback(schema_version=1, event_id="f", prompt=messages, **kind)


def rating(value=1, response="fine", **kw):
    return feedback(rating=events_pb2.Rating(response=response, value=value), **kw)


def comparison(chosen="good", rejected="bad", **kw):
    return feedback(comparison=events_pb2.Comparison(chosen=chosen, rejected=rejected), **kw)


def problem(fb) -> str | None:
    found = feedback_problem(fb, TEXT_LIMITS)
    return None if found is None else found.reason


@pytest.mark.parametrize(
    "fb, expected",
    [
        (rating(), None),
        (comparison(), None),
        (feedback(), "no_rating_or_comparison"),
        (rating(prompt=None), "empty_prompt"),
        (rating(prompt=("user", "x" * 10)), None),
        (rating(prompt=("user", "x" * 11)), "too_long"),
        (rating(response=""), "empty_response"),
        (comparison(rejected=""), "empty_response"),
        (rating(response="y" * 8), None),
        (rating(response="y" * 9), "too_long"),
        (comparison(chosen="z" * 9), "too_long"),
        (comparison(chosen="same", rejected="same"), "identical_responses"),
        (rating(value=-1), None),
        (rating(value=0), "rating_out_of_range"),
        (rating(value=2), "rating_out_of_range"),
        (rating(value=-5), "rating_out_of_range"),
    ],
)
def test_each_feedback_rule(fb, expected):
    assert problem(fb) == expected


def test_feedback_reasons_name_the_field_and_the_limit():
    assert (
        str(feedback_problem(rating(value=7))) == "rating_out_of_range: rating.value: 7, must be +1 (up) or -1 (down)"
    )
    assert (
        str(feedback_problem(rating(response="y" * 9), TEXT_LIMITS))
        == "too_long: rating.response: 9 characters > limit 8 (RLHF_REWARD_MAX_RESPONSE_CHARS)"
    )
    assert feedback_problem(rating(response="y" * 9)) is None  # no limits given: lengths unchecked


def test_a_refused_event_gives_no_example():
    c = FeedbackConverter(limits=TEXT_LIMITS)
    assert c.convert(rating(value=3))[1:] == ([], feedback_problem(rating(value=3)))
    kind, examples, found = c.convert(rating(value=-1))
    assert (kind, examples[0].label, found) == ("thumbs", -1, None)


# --- the rollout worker's live prompts: sources.live_prompt_problem ----------------------------


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "user", "content": "hello"}], None),
        ([], "empty"),
        ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], "empty"),
        ([{"role": "user", "content": "x" * 20}], None),
        ([{"role": "system", "content": "x" * 10}, {"role": "user", "content": "y" * 11}], "too_long"),
    ],
)
def test_each_live_prompt_rule(messages, expected):
    found = live_prompt_problem(messages, max_chars=20)
    assert (None if found is None else found.reason) == expected
