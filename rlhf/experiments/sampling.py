"""Sampling from an in-process causal LM: batched chat answers with their token ids, and
reference log-probs for them — what the rollout worker does over gRPC, here in one process
(the kl-sweep, and eval's reference answers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf.learner.batch import collate
from rlhf.learner.policy import response_logits
from rlhf.ppo import logprobs_from_logits


@dataclass
class Sampled:
    """One answer; the fields rlhf.learner.batch.collate reads, plus its text."""

    prompt: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    ref_logprobs: list[float] = field(default_factory=list)
    score: float = 0.0
    policy_version: int = 0
    event_id: str = ""
    group_id: str = ""  # answers to one prompt sampled together (grpo/rloo compare within it)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    from rlhf.models import chat_prompt_ids

    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


@torch.no_grad()
def sample(
    lm: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int | None = None,
    batch_size: int = 32,
) -> list[Sampled]:
    """One answer per prompt (repeat a prompt for several), pure ancestral sampling
    (top_k=0, top_p=1: the log-probs PPO needs are those of the full distribution).
    Each answer's token ids end with EOS, or at max_new_tokens when cut."""
    from rlhf.models import pad_id

    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    device = next(lm.parameters()).device
    out: list[Sampled] = []
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [prompt_ids(tokenizer, p) for p in chunk]
            width = max(len(i) for i in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, P) left-padded
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, i in enumerate(ids):
                input_ids[row, width - len(i) :] = torch.tensor(i)
                mask[row, width - len(i) :] = 1
            gen = lm.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )[:, width:].tolist()
            for p, i, row in zip(chunk, ids, gen):
                if eos in row:
                    row = row[: row.index(eos) + 1]
                if not row:  # a model that ends at once still gets one token to learn from
                    row = [eos]
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(Sampled(p, i, row, text))
    return out


@torch.no_grad()
def fill_logprobs(policy, samples: list[Sampled], pad_id: int, micro_batch: int = 16) -> None:
    """Set each sample's logprobs (π_θ) and ref_logprobs (π_ref) in place."""
    for start in range(0, len(samples), micro_batch):
        chunk = samples[start : start + micro_batch]
        for s in chunk:
            s.logprobs = s.ref_logprobs = [0.0] * len(s.response_token_ids)
        batch = collate(chunk, pad_id).to(policy.device)
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width, batch.response_width)
        logp = logprobs_from_logits(response_logits(policy.causal_lm, *args)[0], batch.response_ids)  # (b, R)
        with policy.reference() as reference:
            ref = logprobs_from_logits(response_logits(reference, *args)[0], batch.response_ids)  # (b, R)
        for row, s in enumerate(chunk):
            n = len(s.response_token_ids)
            s.logprobs = logp[row, :n].tolist()
            s.ref_logprobs = ref[row, :n].tolist()
