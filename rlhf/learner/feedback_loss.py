"""The users' feedback term of a learner step: DPO on their comparisons, NLL on their endorsed answers.

The examples a step takes from the feedback intake (rlhf/learner/feedback.py) become two
padded batches in the rollouts' layout (prompts left-padded, answers right-padded:
rlhf.learner.batch), and `FeedbackTerm.backward` adds, inside each optimizer step of the
rollout objective, before its gradient is clipped,

    user_feedback_coef × ( L_DPO(users' pairs in this slice) + NLL(users' answers in this slice) )

Each epoch of the step splits the (shuffled) feedback examples over its optimizer steps,
so every example weighs once per epoch, as every rollout does, and the coefficient is what
it says: the weight of the users' loss beside the rollout loss in the same gradient.

  DPO   Rafailov et al. 2023 eq. 7 (rlhf.ppo.dpo_loss) with β = dpo_beta, summed answer
        log-probs, and log π_ref from the in-process reference (PolicyWithValueHead.reference:
        the base with the LoRA adapter off), computed once per step. The pairs are off-policy
        (any version served them, often long ago): DPO does not need them on-policy — its
        loss is a likelihood of the person's choice under the Bradley-Terry model that π_θ/π_ref
        implies, defined for any two answers, with no importance ratio to correct (Guo et al.
        2024 make the pairs on-policy for a better signal, not for the loss to be valid).
  NLL   the token-mean negative log-likelihood of the answer tokens only (the assistant turn
        and its end-of-turn token; rlhf.ppo.distill.best_of_n_loss over every row), as `rlhf
        sft` trains the same answers offline.

Log-probs are at the rollouts' sampling temperature, like every other log-prob of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf.learner.batch import RolloutBatch, collate
from rlhf.learner.feedback import PAIR, FeedbackExample
from rlhf.learner.policy import PolicyWithValueHead, response_logits
from rlhf.ppo import best_of_n_loss, dpo_loss, logprobs_from_logits, sequence_logprobs
from rlhf.ppo.masked import zero_padding


@dataclass(frozen=True)
class _Sequence:
    """A prompt and an answer with the fields collate reads (no behaviour log-probs, no score)."""

    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    event_id: str

    @property
    def logprobs(self) -> list[float]:
        return [0.0] * len(self.response_token_ids)

    ref_logprobs = logprobs
    score = 0.0
    policy_version = 0


@dataclass
class FeedbackBatch:
    pairs: RolloutBatch | None  # (2P, …) rows chosen₀, rejected₀, chosen₁, …; ref_logprobs filled by FeedbackTerm
    answers: RolloutBatch | None  # (N, …) endorsed answers

    @property
    def n_pairs(self) -> int:
        return self.pairs.size // 2 if self.pairs is not None else 0

    @property
    def n_answers(self) -> int:
        return self.answers.size if self.answers is not None else 0

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in (self.pairs, self.answers) if b is not None)

    def to(self, device: torch.device | str) -> FeedbackBatch:
        return FeedbackBatch(*(b.to(device) if b is not None else None for b in (self.pairs, self.answers)))


def collate_feedback(examples: list[FeedbackExample], pad_id: int) -> FeedbackBatch | None:
    """The examples as padded batches; None for no examples."""
    pairs = [
        _Sequence(ex.prompt_ids, ids, ex.event_id)
        for ex in examples
        if ex.kind == PAIR
        for ids in (ex.answer_ids, ex.rejected_ids)
    ]
    answers = [_Sequence(ex.prompt_ids, ex.answer_ids, ex.event_id) for ex in examples if ex.kind != PAIR]
    if not pairs and not answers:
        return None
    return FeedbackBatch(collate(pairs, pad_id) if pairs else None, collate(answers, pad_id) if answers else None)


class FeedbackTerm:
    """The users' loss of one learner step, added slice by slice to its optimizer steps."""

    def __init__(
        self,
        feedback: FeedbackBatch,
        policy: PolicyWithValueHead,
        forward: Callable[[RolloutBatch], tuple[torch.Tensor, torch.Tensor]],
        autocast: Callable[[], Any],
        cfg: Any,
        shuffle: torch.Generator,
    ):
        """`forward`: the trainer's (logits (b, R, V), values) of a micro-batch; `autocast` its
        precision context; `cfg` a PPOConfig; `shuffle` the trainer's RNG (checkpointed)."""
        self.fb = feedback.to(policy.device)
        self.policy, self.forward, self.autocast, self.cfg, self.shuffle = policy, forward, autocast, cfg, shuffle
        self.device = policy.device
        self._orders: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, Any] = {"dpo": 0.0, "nll": 0.0}
        self.ref_seq = self._reference_logprobs() if self.fb.pairs is not None else None  # (2P,)

    @torch.no_grad()
    def _reference_logprobs(self) -> torch.Tensor:
        """(2P,) log π_ref of each answer of the pairs (summed over its tokens), in micro-batches."""
        pairs, cfg = self.fb.pairs, self.cfg
        logprobs = torch.zeros_like(pairs.ref_logprobs)  # (2P, R)
        with self.policy.reference() as ref:
            for rows in torch.arange(pairs.size, device=self.device).split(max(1, cfg.micro_batch_size)):
                mb = pairs.select(rows)
                with self.autocast():
                    logits, _ = response_logits(
                        ref,
                        mb.input_ids,
                        mb.attention_mask,
                        mb.position_ids,
                        mb.prompt_width,
                        mb.response_width,
                        cfg.temperature,
                    )
                logprobs[rows, : mb.response_width] = logprobs_from_logits(logits, mb.response_ids).float()
        pairs.ref_logprobs = zero_padding(logprobs, pairs.response_mask)
        return sequence_logprobs(pairs.ref_logprobs, pairs.response_mask)

    def backward(self, part: int, parts: int) -> None:
        """Accumulate the gradient of slice `part` of `parts` (this optimizer step's share of
        the epoch) into the parameters' .grad; part 0 starts a new epoch, in a new shuffle."""
        if part == 0 or self._orders is None:
            self._orders = (
                torch.randperm(self.fb.n_pairs, generator=self.shuffle).to(self.device),
                torch.randperm(self.fb.n_answers, generator=self.shuffle).to(self.device),
            )
        pair_order, answer_order = self._orders
        pairs = pair_order.tensor_split(parts)[part]
        answers = answer_order.tensor_split(parts)[part]
        if pairs.numel():
            self._dpo_backward(pairs)
        if answers.numel():
            self._nll_backward(answers)

    def _dpo_backward(self, chunk: torch.Tensor) -> None:
        cfg = self.cfg
        for micro in chunk.split(max(1, cfg.micro_batch_size // 2)):  # a pair's two rows share a micro-batch
            rows = torch.stack([2 * micro, 2 * micro + 1], dim=-1).reshape(-1)  # (2p,) chosen, rejected, …
            mb = self.fb.pairs.select(rows)
            logits, _ = self.forward(mb)
            seq = sequence_logprobs(logprobs_from_logits(logits, mb.response_ids), mb.response_mask)  # (2p,)
            loss, stats = dpo_loss(
                seq[0::2], seq[1::2], self.ref_seq[rows[0::2]], self.ref_seq[rows[1::2]], cfg.dpo_beta
            )
            (cfg.user_feedback_coef * loss * micro.numel() / chunk.numel()).backward()
            for key in ("dpo_loss", "dpo_reward_margin", "dpo_accuracy"):
                self._sums["user_" + key] = self._sums.get("user_" + key, 0.0) + stats[key] * micro.numel()
            self._weights["dpo"] += micro.numel()
            del logits, seq, loss

    def _nll_backward(self, chunk: torch.Tensor) -> None:
        cfg, answers = self.cfg, self.fb.answers
        chunk_tokens = answers.response_mask[chunk].sum().clamp_min(1.0)
        for rows in chunk.split(max(1, cfg.micro_batch_size)):
            mb = answers.select(rows)
            logits, _ = self.forward(mb)
            logprobs = logprobs_from_logits(logits, mb.response_ids)  # (b, r)
            every_row = torch.ones(mb.size, dtype=torch.bool, device=self.device)
            nll, _ = best_of_n_loss(logprobs, mb.response_mask, every_row)  # token mean over the answers
            tokens = mb.response_mask.sum()
            (
                cfg.user_feedback_coef * nll * tokens / chunk_tokens
            ).backward()  # token-weighted: sums to the slice's mean
            self._sums["user_distill_loss"] = self._sums.get("user_distill_loss", 0.0) + nll.detach() * tokens
            self._weights["nll"] = self._weights["nll"] + tokens
            del logits, logprobs, nll

    def stats(self) -> dict[str, Any]:
        """The term's diagnostics over the step: pair-weighted DPO stats, token-weighted NLL, counts."""
        out: dict[str, Any] = {
            "user_feedback_pairs": float(self.fb.n_pairs),
            "user_feedback_answers": float(self.fb.n_answers),
        }
        for key, value in self._sums.items():
            weight = self._weights["nll" if key == "user_distill_loss" else "dpo"]
            out[key] = value / weight
        return out
