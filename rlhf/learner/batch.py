"""Rollouts → padded tensors.

A rollout is anything with the fields of `rlhf.v1.events_pb2.Rollout` that PPO needs
(prompt_token_ids, response_token_ids, logprobs, ref_logprobs, score, policy_version,
event_id); nothing here imports the protos.

Layout: prompts left-padded to P, responses right-padded to R, so every response starts
at column P and the response logits are one slice (PolicyWithValueHead.forward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf.validation import Invalid

# Value ranges a rollout's numbers must lie in. Finite is not enough: PPO squares returns
# in the value loss, so a score of 1e20 overflows float32 and ruins the step. These bounds
# are far outside anything a reward model (normalised scores, clipped to ±5 by default)
# or a softmax (a log-prob of −1e4 nats is a probability of e^−10000) produces.
LOGPROB_SLACK = 1e-3  # a log-prob is ≤ 0; this much above is float rounding, more a broken producer
MIN_LOGPROB = -1e4  # nats
MAX_ABS_SCORE = 1e4


@dataclass(frozen=True)
class RolloutLimits:
    """What the policy can read: a token id outside the embedding indexes past it (the
    IndexError that used to kill the learner), a sequence past its positions has no meaning."""

    vocab_size: int  # token ids lie in [0, vocab_size): rows of the input embedding and the LM head
    max_length: int | None  # prompt + response tokens, the model's max_position_embeddings (None: unbounded)

    @classmethod
    def of(cls, lm: torch.nn.Module) -> RolloutLimits:
        """The limits of a transformers causal LM (the rows it has, not the tokenizer's length)."""
        rows = lm.get_input_embeddings().weight.shape[0]
        head = lm.get_output_embeddings()
        if head is not None:
            rows = min(rows, head.weight.shape[0])
        return cls(vocab_size=rows, max_length=getattr(lm.config, "max_position_embeddings", None))


def invalid_reason(rollout: Any, limits: RolloutLimits | None = None) -> Invalid | None:
    """Why a rollout cannot be trained on, or None if it can; the reasons are empty,
    lengths, token_id, too_long, non_finite and out_of_range.

    Checks shape (non-empty, one log-prob and one reference log-prob per response token),
    with `limits` the token ids and the total length, and the values: finite, log-probs in
    [MIN_LOGPROB, 0], |score| ≤ MAX_ABS_SCORE. Versions need the learner's lineage:
    RolloutIntake checks those.
    """
    prompt, response = rollout.prompt_token_ids, rollout.response_token_ids
    n = len(response)
    if not prompt:
        return Invalid("empty", "prompt_token_ids is empty")
    if n == 0:
        return Invalid("empty", "response_token_ids is empty")
    if len(rollout.logprobs) != n or len(rollout.ref_logprobs) != n:
        return Invalid(
            "lengths",
            f"{n} response tokens but {len(rollout.logprobs)} logprobs and {len(rollout.ref_logprobs)} ref_logprobs",
        )
    if limits is not None:
        for name, ids in (("prompt_token_ids", prompt), ("response_token_ids", response)):
            if min(ids) < 0 or max(ids) >= limits.vocab_size:
                i, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t < limits.vocab_size)
                return Invalid(
                    "token_id", f"{name}[{i}] = {bad} is outside the policy's vocabulary [0, {limits.vocab_size})"
                )
        if limits.max_length is not None and len(prompt) + n > limits.max_length:
            return Invalid(
                "too_long",
                f"{len(prompt)} prompt + {n} response tokens > the model's max_position_embeddings {limits.max_length}",
            )
    for name in ("logprobs", "ref_logprobs"):
        for i, x in enumerate(getattr(rollout, name)):
            if not math.isfinite(x):
                return Invalid("non_finite", f"{name}[{i}] = {x}")
            if not MIN_LOGPROB <= x <= LOGPROB_SLACK:
                return Invalid("out_of_range", f"{name}[{i}] = {x:g} is not a log-probability in [{MIN_LOGPROB:g}, 0]")
    if not math.isfinite(rollout.score):
        return Invalid("non_finite", f"score = {rollout.score}")
    if abs(rollout.score) > MAX_ABS_SCORE:
        return Invalid("out_of_range", f"score = {rollout.score:g} is outside [-{MAX_ABS_SCORE:g}, {MAX_ABS_SCORE:g}]")
    return None


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, P+R) long, pad_id on padding
    attention_mask: torch.Tensor  # (B, P+R) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, P+R) long, counting real tokens only
    response_ids: torch.Tensor  # (B, R)   long
    response_mask: torch.Tensor  # (B, R)   float, 1 on response tokens
    logprobs: torch.Tensor  # (B, R)   log π_behaviour(a_t|s_t) from the rollout, 0 on padding
    ref_logprobs: torch.Tensor  # (B, R)   log π_ref(a_t|s_t), 0 on padding
    scores: torch.Tensor  # (B,)     r_φ(x, y)
    policy_versions: torch.Tensor  # (B,)    long, version that generated each rollout
    prompt_width: int  # P
    group_ids: torch.Tensor | None = None  # (B,) long, rollouts of one Generate(n) call share one (group_index)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) prompt + response tokens."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(
            **{
                f.name: getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
                for f in fields(self)
            }
        )

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The given rows, with columns that are padding in every one of them cut away
        (fewer positions to run when a minibatch's prompts or responses are short)."""
        rows = rows.to(self.input_ids.device)
        sub = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in sub.items():
            if isinstance(value, torch.Tensor):
                sub[name] = value.index_select(0, rows)
        prompt_mask = sub["attention_mask"][:, : self.prompt_width]
        drop_left = int((prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad columns
        keep_right = int(sub["response_mask"].sum(0).nonzero().max()) + 1 if sub["response_mask"].any() else 1
        cut = slice(drop_left, self.prompt_width + keep_right)
        for name in ("input_ids", "attention_mask", "position_ids"):
            sub[name] = sub[name][:, cut]
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs"):
            sub[name] = sub[name][:, :keep_right]
        sub["prompt_width"] = self.prompt_width - drop_left
        return RolloutBatch(**sub)


def collate(rollouts: Sequence[Any], pad_id: int) -> RolloutBatch:
    """Pad a list of valid rollouts (see invalid_reason) into one batch."""
    if not rollouts:
        raise ValueError("collate needs at least one rollout")
    for r in rollouts:
        reason = invalid_reason(r)
        if reason is not None:
            raise ValueError(f"rollout {getattr(r, 'event_id', '?')}: {reason}")
    B = len(rollouts)
    P = max(len(r.prompt_token_ids) for r in rollouts)
    R = max(len(r.response_token_ids) for r in rollouts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R))
    logprobs = torch.zeros((B, R))
    ref_logprobs = torch.zeros((B, R))
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_token_ids), len(r.response_token_ids)
        input_ids[i, P - p : P] = torch.as_tensor(list(r.prompt_token_ids), dtype=torch.long)
        input_ids[i, P : P + n] = torch.as_tensor(list(r.response_token_ids), dtype=torch.long)
        attention_mask[i, P - p : P + n] = 1
        response_mask[i, :n] = 1
        logprobs[i, :n] = torch.as_tensor(list(r.logprobs))
        ref_logprobs[i, :n] = torch.as_tensor(list(r.ref_logprobs))
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        response_ids=input_ids[:, P:].clone(),
        response_mask=response_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        scores=torch.tensor([float(r.score) for r in rollouts]),
        policy_versions=torch.tensor([int(r.policy_version) for r in rollouts], dtype=torch.long),
        prompt_width=P,
        group_ids=group_index(rollouts),
    )


def group_index(rollouts: Sequence[Any]) -> torch.Tensor:
    """(B,) long: rollouts with the same non-empty `group_id` share a number (0, 1, … in
    order of first appearance); one without a group_id is a group of its own."""
    numbers: dict[tuple[str, Any], int] = {}
    out = []
    for i, r in enumerate(rollouts):
        group = getattr(r, "group_id", "")
        key = ("group", group) if group else ("row", i)
        out.append(numbers.setdefault(key, len(numbers)))
    return torch.tensor(out, dtype=torch.long)
