"""Users' Feedback events as policy examples (rlhf/learner/feedback.py, feedback_loss.py): what
each event gives per mode, why one is refused, the tokens (the loss on answer tokens only),
the intake's offsets, and the term the trainer adds to its optimizer steps."""

from __future__ import annotations

import contextlib

import pytest
import torch
from pydantic import ValidationError

from rlhf.bus import Record, new_event
from rlhf.learner import LearnerConfig, LearnerState, PPOConfig, PPOTrainer, build_policy
from rlhf.learner.feedback import ANSWER, PAIR, FeedbackLimits, answer_tokens, feedback_examples
from rlhf.learner.feedback_intake import FeedbackIntake
from rlhf.learner.feedback_loss import FeedbackTerm, collate_feedback
from rlhf.models import chat_prompt_ids, load_tokenizer, pad_id, sequence_logprobs
from rlhf.v1 import common_pb2, events_pb2
from tests.unit.test_learner import rollouts

LIMITS = FeedbackLimits(max_prompt_tokens=64, max_answer_tokens=32)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def feedback(prompt: str = "What is the capital of France?", **fields) -> events_pb2.Feedback:
    return new_event(
        events_pb2.Feedback,
        conversation_id="c",
        prompt=[common_pb2.ChatMessage(role="user", content=prompt)] if prompt else [],
        **fields,
    )


def comparison(chosen="Paris.", rejected="Lyon.", outcome=events_pb2.COMPARISON_OUTCOME_CHOSEN, **fields):
    return feedback(comparison=events_pb2.Comparison(chosen=chosen, rejected=rejected, outcome=outcome), **fields)


def rating(value: int, response="Paris.", **fields):
    return feedback(rating=events_pb2.Rating(response=response, value=value), **fields)


# --- tokens: the loss is on the answer's tokens only ------------------------------------


def test_answer_tokens_are_the_assistant_turn_after_the_generators_prompt(tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt, answer = answer_tokens(tok, messages, "Paris.")
    assert list(prompt) == chat_prompt_ids(tok, messages)  # what the generator sends, assistant header included
    assert answer[-1] == tok.eos_token_id and tok.eos_token_id not in answer[:-1]  # up to its end of turn
    assert tok.decode(list(answer[:-1])) == "Paris."
    full = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": "Paris."}], tokenize=True, return_dict=False
    )
    assert list(full[: len(prompt) + len(answer)]) == list(prompt + answer)  # nothing left out in between


def test_the_nll_term_is_the_answers_own_log_likelihood(tiny_model_dir, tok):
    # the term's NLL equals −mean log π(answer token | prompt, answer so far) computed
    # independently: no prompt token and no padding is in the loss
    cfg = PPOConfig(finetune="full", batch_size=2, minibatch_size=2, micro_batch_size=2, user_feedback_coef=1.0)
    policy = build_policy(tiny_model_dir, cfg)
    examples = []
    for fb in [rating(1, "Paris."), rating(1, "It is Paris, on the Seine.", prompt="Capital? " * 3)]:
        [ex] = feedback_examples(fb, "distill", tok, LIMITS)
        examples.append(ex)
    batch = collate_feedback(examples, pad_id(tok))
    assert batch.n_answers == 2 and batch.pairs is None
    assert batch.answers.response_mask.sum(-1).tolist() == [len(ex.answer_ids) for ex in examples]

    def forward(mb):
        return policy(mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_width, mb.response_width)

    term = FeedbackTerm(batch, policy, forward, contextlib.nullcontext, cfg, torch.Generator())
    term.backward(0, 1)
    expected = torch.cat([sequence_logprobs(policy.lm, ex.prompt_ids, ex.answer_ids) for ex in examples])
    assert term.stats()["user_distill_loss"] == pytest.approx(float(-expected.mean()), abs=1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


# --- what each event gives, per mode -------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "mode", "kinds"),
    [
        (comparison(), "dpo", [PAIR]),
        (comparison(), "distill", []),  # a comparison without a correction: only relative
        (comparison(corrected_answer="Paris, of course."), "both", [PAIR, ANSWER]),
        (comparison(outcome=events_pb2.COMPARISON_OUTCOME_TIE), "dpo", []),  # no preferred answer
        (comparison(outcome=events_pb2.COMPARISON_OUTCOME_BOTH_BAD), "both", []),
        (rating(1), "dpo", []),
        (rating(1), "distill", [ANSWER]),
        (rating(-1), "distill", []),  # a thumbs-down: the reward model has it
        (rating(-1, corrected_answer="Paris."), "distill", [ANSWER]),
    ],
)
def test_each_mode_takes_its_examples(tok, event, mode, kinds):
    got = feedback_examples(event, mode, tok, LIMITS)
    assert [ex.kind for ex in got] == kinds
    assert all(ex.event_id == event.event_id for ex in got)


def test_a_corrected_answer_wins_over_the_rated_one(tok):
    [ex] = feedback_examples(rating(1, "Lyon.", corrected_answer="Paris."), "distill", tok, LIMITS)
    assert tok.decode(list(ex.answer_ids[:-1])) == "Paris."


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (comparison("Same.", "Same."), "identical_responses: comparison: chosen and rejected are the same text"),
        (comparison("   ", "Lyon."), "empty_response: comparison.chosen is only whitespace"),
        (comparison(rejected=""), "empty_response: comparison.rejected is empty"),
        (comparison(prompt=""), "empty_prompt: prompt: no messages"),
        (comparison(prompt="  "), "empty_prompt: prompt: every message is empty or whitespace"),
        (comparison(prompt="word " * 200), "too_long: prompt: "),
        (comparison(chosen="long " * 100), "too_long: comparison.chosen: "),
        (feedback(comparison=events_pb2.Comparison(chosen="a", rejected="b"), corrected_answer="x " * 100), None),
        (rating(3), "rating_out_of_range: rating.value: 3"),
    ],
)
def test_meaningless_feedback_is_refused_with_the_field_and_the_limit(tok, event, expected):
    got = feedback_examples(event, "both", tok, LIMITS)
    if expected is None:  # an over-long correction is refused too, naming its field
        assert str(got).startswith("too_long: corrected_answer: ")
        return
    assert str(got).startswith(expected), str(got)
    if expected.startswith("too_long: prompt"):
        assert "> limit 64 (RLHF_LEARNER_USER_FEEDBACK_MAX_PROMPT_TOKENS)" in str(got)


def test_a_role_the_template_does_not_take_is_refused(tok):
    fb = comparison()
    fb.prompt[0].role = "robot"
    assert str(feedback_examples(fb, "dpo", tok, LIMITS)) == (
        "messages: prompt[0].role: 'robot' is not one of system, user, assistant"
    )
    fb.prompt[0].role = "assistant"
    assert str(feedback_examples(fb, "dpo", tok, LIMITS)).startswith("messages: prompt[0].role: a conversation starts")


# --- the intake: buffered oldest first, offsets, exactly once --------------------------------


def record(event, offset: int, topic: str = "t.feedback") -> Record:
    return Record(topic, 0, offset, None, event, {}, event.SerializeToString())


def test_intake_hands_out_the_oldest_and_stores_offsets_a_restart_can_trust(tok):
    state = LearnerState()
    dead = []
    intake = FeedbackIntake(state, "dpo", tok, LIMITS, max_per_step=2, dead_letter=lambda r, why: dead.append(why))
    events = [comparison(f"A{i}.", f"B{i}.") for i in range(3)]
    bad, thumbs = comparison("x", "x"), rating(1)
    intake.add([record(events[0], 0), record(bad, 1), record(events[1], 2), record(thumbs, 3), record(events[2], 4)])
    assert len(intake) == 3 and dead == ["identical_responses: comparison: chosen and rejected are the same text"]
    assert intake.safe_offsets() == {("t.feedback", 0): 0}  # event 0 still waits
    taken = intake.take()
    assert [rec.offset for rec, _ in taken] == [0, 2]
    assert intake.safe_offsets() == {("t.feedback", 0): 4}
    assert intake.handled_above() == {}
    assert intake.pop_dropped() == {
        "feedback_skipped": [thumbs.event_id],
        "feedback_invalid": [bad.event_id],
        "feedback_failed": [],
    }
    assert (state.feedback_invalid, state.feedback_skipped) == (1, 1)


def test_intake_restarted_from_a_checkpoint_skips_what_was_handled_above_its_offset(tok):
    state = LearnerState()
    intake = FeedbackIntake(state, "dpo", tok, LIMITS, max_per_step=4)
    waiting, bad = comparison(), comparison("x", "x")
    intake.add([record(waiting, 0), record(bad, 1)])
    state.feedback_offsets, state.feedback_handled_above = intake.safe_offsets(), intake.handled_above()
    restored = LearnerState.from_json(state.to_json())
    assert restored.feedback_offsets == {("t.feedback", 0): 0}
    assert restored.feedback_handled_above == {("t.feedback", 0): [1]}
    dead = []
    again = FeedbackIntake(restored, "dpo", tok, LIMITS, 4, dead_letter=lambda r, why: dead.append(why))
    again.add([record(waiting, 0), record(bad, 1)])  # what the consumer reads after seeking
    assert len(again) == 1 and dead == []  # the bad one is not dead-lettered twice


def test_a_checkpoint_from_before_user_feedback_loads_with_no_feedback_offsets():
    old = LearnerState(step=3).to_json()
    for key in [k for k in old if k.startswith("feedback")]:
        del old[key]
    state = LearnerState.from_json(old)
    assert state.step == 3 and state.feedback_offsets == {} and state.feedback_trained == 0


def test_the_buffer_is_bounded(tok):
    intake = FeedbackIntake(LearnerState(), "dpo", tok, LIMITS, max_per_step=1)
    intake.add([record(comparison(f"A{i}", f"B{i}"), i) for i in range(4)])
    assert intake.full and intake.max_buffered == 4


# --- settings -------------------------------------------------------------------------------------


def test_user_feedback_settings_are_checked():
    assert LearnerConfig().user_feedback == "none"
    with pytest.raises(ValidationError, match="user_feedback_coef must be > 0"):
        LearnerConfig(user_feedback="dpo", user_feedback_coef=0)
    with pytest.raises(ValidationError, match="user_feedback_max_per_step must be ≥ 1"):
        LearnerConfig(user_feedback="both", user_feedback_max_per_step=0)
    LearnerConfig(user_feedback="none", user_feedback_coef=0)  # off: nothing to weigh
    with pytest.raises(ValidationError, match="user_feedback_alone=True trains steps on users' Feedback events"):
        LearnerConfig(user_feedback_alone=True)  # with user_feedback="none" nothing is read to step on


# --- the trainer: the users' loss in the rollout objective's optimizer steps -----------------


def user_pairs(tok, n: int = 4):
    exs = []
    for i in range(n):
        [ex] = feedback_examples(comparison("Paris.", "Lyon.", prompt=f"Capital of France, {i}?"), "dpo", tok, LIMITS)
        exs.append(ex)
    return collate_feedback(exs, pad_id(tok))


def margin(policy, batch) -> float:
    """Mean (log π(chosen) − log π(rejected)) over the pairs."""
    pairs = batch.pairs
    out = []
    for i in range(0, pairs.size, 2):
        seqs = []
        for row in (i, i + 1):
            p = pairs.attention_mask[row, : pairs.prompt_width].bool()
            r = pairs.response_mask[row].bool()
            seqs.append(
                sequence_logprobs(policy.lm, pairs.input_ids[row, : pairs.prompt_width][p], pairs.response_ids[row][r])
            )
        out.append(float(seqs[0].sum() - seqs[1].sum()))
    return sum(out) / len(out)


@pytest.mark.parametrize("objective", ["ppo", "online_dpo"])
def test_users_pairs_raise_the_chosen_answers_margin(tiny_model_dir, tok, objective):
    # online_dpo on a batch of ties takes no optimizer step of its own: the users' loss then trains alone
    cfg = PPOConfig(
        objective=objective, finetune="lora", batch_size=8, minibatch_size=4, micro_batch_size=4, lr=1e-2, ppo_epochs=2,
        user_feedback="dpo", user_feedback_coef=1.0, dpo_beta=0.5,
    )  # fmt: skip
    policy = build_policy(tiny_model_dir, cfg)
    trainer = PPOTrainer(policy, cfg)
    fb = user_pairs(tok)
    from rlhf.learner.batch import collate

    batch = collate(rollouts(8), 2)
    before = margin(policy, fb)
    stats = [trainer.step(batch, fb) for _ in range(3)]
    after = margin(policy, fb)
    assert after > before + 0.1, (before, after)
    assert stats[0]["user_feedback_pairs"] == 4.0 and stats[0]["user_dpo_loss"] > stats[-1]["user_dpo_loss"]
    assert stats[-1]["user_dpo_accuracy"] == 1.0 and stats[-1]["user_dpo_reward_margin"] > 0
