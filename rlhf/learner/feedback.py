"""Users' own Feedback events (rlhf.feedback) as policy training examples: what each event
gives, why one is refused, and the intake that holds them until the next learner step.

With `user_feedback` set, the learner reads the topic the reward model learns from and
turns each event into examples of two kinds (guided by Guo et al. 2024, OAIF: the policy
can learn from preferences directly, not only through a reward model):

  pair    a Comparison: (prompt, chosen, rejected) → the DPO loss (user_feedback=dpo|both)
  answer  an endorsed answer → its NLL (user_feedback=distill|both): a thumbs-up answer
          (Rating +1), or the person's `corrected_answer` on any event, which wins over
          the served answer as it does for `rlhf sft` (rlhf/sft/data.py)

A thumbs-down without a correction gives nothing here (the reward model has it), and neither
does what the mode does not train (ratings under dpo, comparisons without a correction under
distill): such an event is `skipped`, counted, and handled. An event that would give an
example but means nothing is `invalid`: dead-lettered to rlhf.feedback.dlq with the reason,
counted by it, handled, and the loop goes on. The reasons are the reward service's
(rlhf.reward.data.feedback_problem: no_rating_or_comparison, empty_prompt, empty_response,
identical_responses, rating_out_of_range) plus the learner's own, on tokens: too_long
(user_feedback_max_prompt_tokens, user_feedback_max_answer_tokens, the model's positions),
messages (a role the chat template does not take), template, token_id.

Tokens: the prompt messages plus the answer rendered by the model's chat template; the
answer's tokens are the assistant turn up to and including its end-of-turn token, exactly
the span `rlhf sft` puts its loss on (rlhf.sft.data.tokenize), and the prompt is everything
before them (what the generator sends: it ends with the assistant header).

The intake that buffers the examples until the next step, exactly once, is
rlhf/learner/feedback_intake.py; the loss they train with, rlhf/learner/feedback_loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.learner.batch import RolloutLimits
from rlhf.v1.events_pb2 import COMPARISON_OUTCOME_CHOSEN as CHOSEN
from rlhf.validation import Invalid

PAIR, ANSWER = "pair", "answer"


@dataclass(frozen=True)
class FeedbackLimits:
    max_prompt_tokens: int
    max_answer_tokens: int
    model: RolloutLimits | None = None  # the policy's vocabulary and positions

    @classmethod
    def of(cls, cfg: Any, lm: Any = None) -> FeedbackLimits:
        """From a LearnerConfig's user_feedback_max_* settings and the policy's causal LM."""
        return cls(
            cfg.user_feedback_max_prompt_tokens,
            cfg.user_feedback_max_answer_tokens,
            RolloutLimits.of(lm) if lm is not None else None,
        )


@dataclass(frozen=True)
class FeedbackExample:
    """One training example from a Feedback event: token ids, prompt then answer(s)."""

    kind: str  # PAIR or ANSWER
    event_id: str
    prompt_ids: tuple[int, ...]  # chat template up to the assistant header
    answer_ids: tuple[int, ...]  # ANSWER: the endorsed answer; PAIR: the chosen one
    rejected_ids: tuple[int, ...] = ()  # PAIR: the rejected answer


def wanted_answers(fb: Any, mode: str) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """What `mode` trains of one events_pb2.Feedback, before any check: (pair fields, answer
    field), each a (field name, text); ([], None) when it trains nothing (skipped)."""
    which = fb.WhichOneof("kind")
    pair: list[tuple[str, str]] = []
    answer = None
    # a tie or both-bad judgement names no preferred answer: nothing to pull towards
    if mode in ("dpo", "both") and which == "comparison" and fb.comparison.outcome == CHOSEN:
        pair = [("comparison.chosen", fb.comparison.chosen), ("comparison.rejected", fb.comparison.rejected)]
    if mode in ("distill", "both"):
        if fb.corrected_answer.strip():
            answer = ("corrected_answer", fb.corrected_answer)
        elif which == "rating" and fb.rating.value > 0:
            answer = ("rating.response", fb.rating.response)
    return pair, answer


def feedback_examples(fb: Any, mode: str, tokenizer: Any, limits: FeedbackLimits) -> list[FeedbackExample] | Invalid:
    """The examples `mode` ("dpo", "distill", "both") trains from one events_pb2.Feedback:
    [] when it trains none of it, an Invalid when the event cannot be trained."""
    from rlhf.reward.data import feedback_problem
    from rlhf.sft.data import ROLES

    pair, answer = wanted_answers(fb, mode)
    if not pair and answer is None:
        return []
    problem = feedback_problem(fb)  # the meaning checks the reward service makes, same reasons
    if problem is not None:
        return problem
    for i, m in enumerate(fb.prompt):
        if m.role not in ROLES:
            return Invalid("messages", f"prompt[{i}].role: {m.role!r} is not one of {', '.join(ROLES)}")
    if fb.prompt[0].role == "assistant":
        return Invalid("messages", "prompt[0].role: a conversation starts with a system or user message")
    if not any(m.content.strip() for m in fb.prompt):
        return Invalid("empty_prompt", "prompt: every message is empty or whitespace")
    for field, text in pair + ([answer] if answer else []):
        if not text.strip():
            return Invalid("empty_response", f"{field} is only whitespace")
    messages = [{"role": m.role, "content": m.content} for m in fb.prompt]
    tokens: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for field, text in pair + ([answer] if answer else []):
        got = answer_tokens(tokenizer, messages, text, field)
        if isinstance(got, Invalid):
            return got
        tokens[field] = got
        reason = _token_problem(field, *got, limits)
        if reason is not None:
            return reason
    out = []
    if pair:
        (chosen_field, _), (rejected_field, _) = pair
        prompt_ids, chosen = tokens[chosen_field]
        out.append(FeedbackExample(PAIR, fb.event_id, prompt_ids, chosen, tokens[rejected_field][1]))
    if answer is not None:
        prompt_ids, ids = tokens[answer[0]]
        out.append(FeedbackExample(ANSWER, fb.event_id, prompt_ids, ids))
    return out


def answer_tokens(
    tokenizer: Any, messages: list[dict[str, str]], answer: str, field: str = "answer"
) -> tuple[tuple[int, ...], tuple[int, ...]] | Invalid:
    """(prompt ids, answer ids) of `messages` + the assistant `answer`, rendered by the chat
    template: the answer's ids are those `rlhf sft` puts its loss on (the assistant turn up to
    and including its end-of-turn token), the prompt's everything before them."""
    from rlhf.sft.data import IGNORE, Example, SFTDataError, check_messages, tokenize

    chat = messages + [{"role": "assistant", "content": answer}]
    try:
        checked = check_messages(chat, field)
        full, labels = tokenize(tokenizer, Example(checked, (len(checked) - 1,)))
    except SFTDataError as e:
        reason = "template" if "chat template" in str(e) else "messages"
        return Invalid(reason, str(e))
    except Exception as e:  # noqa: BLE001 - a template that raises on this input refuses the event, not the learner
        return Invalid("template", f"{field}: the chat template failed: {type(e).__name__}: {e}"[:500])
    span = [i for i, label in enumerate(labels) if label != IGNORE]
    if not span:
        return Invalid("empty_response", f"{field}: no tokens after the chat template")
    start, end = span[0], span[-1] + 1
    return tuple(full[:start]), tuple(full[start:end])


def _token_problem(
    field: str, prompt: tuple[int, ...], answer: tuple[int, ...], limits: FeedbackLimits
) -> Invalid | None:
    if len(prompt) > limits.max_prompt_tokens:
        return Invalid(
            "too_long",
            f"prompt: {len(prompt)} tokens > limit {limits.max_prompt_tokens} "
            "(RLHF_LEARNER_USER_FEEDBACK_MAX_PROMPT_TOKENS)",
        )
    if len(answer) > limits.max_answer_tokens:
        return Invalid(
            "too_long",
            f"{field}: {len(answer)} tokens > limit {limits.max_answer_tokens} "
            "(RLHF_LEARNER_USER_FEEDBACK_MAX_ANSWER_TOKENS)",
        )
    model = limits.model
    if model is None:
        return None
    if model.max_length is not None and len(prompt) + len(answer) > model.max_length:
        return Invalid(
            "too_long",
            f"{field}: {len(prompt)} prompt + {len(answer)} answer tokens > the model's max_position_embeddings "
            f"{model.max_length}",
        )
    bad = next((t for t in prompt + answer if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        return Invalid(
            "token_id", f"{field}: token id {bad} is outside the policy's vocabulary [0, {model.vocab_size})"
        )
    return None
