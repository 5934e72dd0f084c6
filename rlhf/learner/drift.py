"""Drift gate: KL(π_new ‖ π_ref) on a fixed held-out prompt set, before promotion.

The training KL is measured on the rollouts the policy chose to train on; the gate asks
the same question on prompts it never trained on, with a fixed sampling seed, so two
versions are compared on equal terms. For each held-out prompt it samples responses
from π_new and sums, over the response, the exact per-token KL over the vocabulary:

    KL_seq = E_{y ~ π_new} [ Σ_t KL(π_new(·|x, y_<t) ‖ π_ref(·|x, y_<t)) ]

which is the sequence-level KL(π_new ‖ π_ref) (chain rule), estimated with far less
variance than summing log-ratios of the sampled tokens (k1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.learner.batch import collate
from rlhf.learner.policy import PolicyWithValueHead, response_logits
from rlhf.ppo.masked import masked_sum

# Small, varied, never trained on: the default held-out set when no file is given.
DEFAULT_HELDOUT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me three tips for better sleep.",
    "What does a compiler do?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
)


@dataclass
class GateResult:
    kl: float  # nats per response, mean over held-out samples
    budget: float
    passed: bool
    reason: str


@dataclass
class _Sample:
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]
    ref_logprobs: list[float]
    score: float = 0.0
    policy_version: int = 0


class DriftGate:
    def __init__(
        self,
        prompt_ids: Sequence[Sequence[int]],
        budget: float,
        pad_id: int,
        eos_id: int | None,
        max_new_tokens: int = 32,
        samples_per_prompt: int = 2,
        seed: int = 1234,
        temperature: float = 1.0,
    ):
        if not prompt_ids:
            raise ValueError("the drift gate needs at least one held-out prompt")
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.budget = budget
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.temperature = temperature

    @torch.no_grad()
    def sample(self, policy: PolicyWithValueHead) -> list[_Sample]:
        """Responses from π_new, the same ones for the same weights (fixed seed)."""
        lm = policy.causal_lm
        samples = []
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for ids in self.prompt_ids:
                prompt = torch.tensor([ids] * self.samples_per_prompt, device=policy.device)
                out = lm.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                )[:, len(ids) :]
                for row in out.tolist():
                    if self.eos_id is not None and self.eos_id in row:
                        row = row[: row.index(self.eos_id) + 1]
                    if row:
                        samples.append(_Sample(ids, row, [0.0] * len(row), [0.0] * len(row)))
        return samples

    @torch.no_grad()
    def measure(self, policy: PolicyWithValueHead) -> float:
        """KL(π_new ‖ π_ref) per response, nats, averaged over the held-out samples."""
        samples = self.sample(policy)
        if not samples:
            return 0.0
        batch = collate(samples, self.pad_id).to(policy.device)
        args = (
            batch.input_ids,
            batch.attention_mask,
            batch.position_ids,
            batch.prompt_width,
            batch.response_width,
            self.temperature,
        )
        new_logp = F.log_softmax(response_logits(policy.causal_lm, *args)[0].float(), -1)  # (N, R, V)
        with policy.reference() as reference:
            ref_logp = F.log_softmax(response_logits(reference, *args)[0].float(), -1)  # (N, R, V)
        per_token = (new_logp.exp() * (new_logp - ref_logp)).sum(-1)  # (N, R) exact KL per state
        return float(masked_sum(per_token, batch.response_mask, dim=1).mean())

    def check(self, policy: PolicyWithValueHead) -> GateResult:
        kl = self.measure(policy)
        if kl > self.budget:
            return GateResult(kl, self.budget, False, f"KL to reference {kl:.3f} nats exceeds budget {self.budget:.3f}")
        return GateResult(kl, self.budget, True, "")
