"""Rollouts → padded tensors.

A rollout is anything with the fields of `rlhf.v1.events_pb2.Rollout` that PPO needs
(prompt_token_ids, response_token_ids, logprobs, ref_logprobs, score, policy_version,
event_id); nothing here imports the protos.

Layout: prompts left-padded to P, responses right-padded to R, so every response starts
at column P and the response logits are one slice (PolicyWithValueHead.forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch


def invalid_reason(rollout: Any) -> str | None:
    """Why a rollout cannot be trained on, or None if it can."""
    n = len(rollout.response_token_ids)
    if not rollout.prompt_token_ids:
        return "empty prompt_token_ids"
    if n == 0:
        return "empty response_token_ids"
    if len(rollout.logprobs) != n or len(rollout.ref_logprobs) != n:
        return (
            f"{n} response tokens but {len(rollout.logprobs)} logprobs and "
            f"{len(rollout.ref_logprobs)} ref_logprobs"
        )
    return None


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor       # (B, P+R) long, pad_id on padding
    attention_mask: torch.Tensor  # (B, P+R) long, 1 on real tokens
    position_ids: torch.Tensor    # (B, P+R) long, counting real tokens only
    response_ids: torch.Tensor    # (B, R)   long
    response_mask: torch.Tensor   # (B, R)   float, 1 on response tokens
    logprobs: torch.Tensor        # (B, R)   log π_behaviour(a_t|s_t) from the rollout, 0 on padding
    ref_logprobs: torch.Tensor    # (B, R)   log π_ref(a_t|s_t), 0 on padding
    scores: torch.Tensor          # (B,)     r_φ(x, y)
    policy_versions: torch.Tensor  # (B,)    long, version that generated each rollout
    prompt_width: int             # P

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
        return RolloutBatch(**{
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        })

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
        if reason:
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
    )
