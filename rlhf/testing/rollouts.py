"""Rollouts without the rest of the loop: sample from a policy with HF generate, score with
a fixed rule, take log π_ref from a frozen model. For tests, benchmarks and demos of the
learner alone; the rollout service does the same job with the Generation, Reward and
Reference services.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf.learner.batch import collate
from rlhf.learner.policy import response_logits
from rlhf.ppo import logprobs_from_logits


class TokenSetReward:
    """A fixed-seed reward preferring one behaviour: the fraction of response tokens that
    fall in a random subset of the vocabulary (`fraction` of it). A random policy scores
    ≈ fraction; a policy that learned the preference scores more."""

    def __init__(self, vocab_size: int, fraction: float = 0.25, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.preferred = torch.rand(vocab_size, generator=g) < fraction  # (V,) bool

    def __call__(self, response_ids: Sequence[int]) -> float:
        if not response_ids:
            return 0.0
        return float(self.preferred[torch.as_tensor(list(response_ids))].float().mean())


@torch.no_grad()
def sample_rollouts(
    policy_lm: torch.nn.Module,
    reference_lm: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    reward: Callable[[Sequence[int]], float],
    policy_version: int,
    *,
    max_new_tokens: int = 16,
    min_new_tokens: int = 0,
    pad_id: int = 0,
    eos_id: int | None = None,
    temperature: float = 1.0,
    seed: int | None = None,
    make_event: Callable[..., Any] | None = None,
) -> list:
    """One Rollout event per prompt, sampled from policy_lm (left-padded batch generate).

    Log-probs are recomputed with one plain forward of each model, the way the generator
    and reference services report them. `make_event(**fields)` builds each rollout; the
    default is an rlhf.v1.Rollout from rlhf.bus.new_event.
    """
    if make_event is None:
        from rlhf.bus import new_event
        from rlhf.v1 import events_pb2

        def make_event(**fields):
            return new_event(events_pb2.Rollout, **fields)

    device = next(policy_lm.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p))
        mask[i, width - len(p) :] = 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = policy_lm.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )[:, width:].tolist()
    responses = []
    for row in out:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        responses.append(row)
    finish = ["stop" if eos_id is not None and r[-1:] == [eos_id] else "length" for r in responses]
    rollouts = [
        make_event(
            prompt_id=f"p{i}",
            prompt_token_ids=list(p),
            response_token_ids=r,
            logprobs=[0.0] * len(r),
            ref_logprobs=[0.0] * len(r),
            score=reward(r),
            raw_score=reward(r),
            policy_version=policy_version,
            finish_reason=f,
            source="prompt_set",
        )
        for i, (p, r, f) in enumerate(zip(prompts, responses, finish))
    ]
    batch = collate(rollouts, pad_id).to(device)
    for lm, name in ((policy_lm, "logprobs"), (reference_lm, "ref_logprobs")):
        logits, _ = response_logits(
            lm,
            batch.input_ids,
            batch.attention_mask,
            batch.position_ids,
            batch.prompt_width,
            batch.response_width,
            temperature,
        )
        lp = logprobs_from_logits(logits, batch.response_ids).cpu()
        for i, r in enumerate(rollouts):
            getattr(r, name)[:] = lp[i, : len(r.response_token_ids)].tolist()
    return rollouts
