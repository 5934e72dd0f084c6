"""One learner step on a batch of rollouts (InstructGPT stage 3, the seed's "PPO optimisation").

The rollout brings the tokens, the RM score and log π_ref; the learner brings the critic.
A step is cleanrl's loop over a batch that arrived from Kafka instead of from env.step():

  1. log π_old and V_old under the current weights (one no-grad pass)
  2. KL-penalised per-token rewards  r_t = −β·kl_t (+ score at the last token)
  3. GAE advantages and returns, advantages whitened over the batch
  4. K epochs × shuffled minibatches of the clipped policy + value loss, gradient
     accumulation over micro-batches, global-norm clipping, LR schedule
  5. adaptive β from the batch's KL (Ziegler et al. 2019)

`objective` swaps steps 2–4 (rlhf/ppo/group.py, rlhf/ppo/dpo.py): grpo and rloo replace the
critic and GAE by group-relative sequence advantages broadcast to every token, with KL in
the reward or as a k3 loss term, and keep the clipped surrogate; online_dpo takes the DPO
loss on each group's best and worst response instead, best_of_n the NLL of each group's
top-scored response (RAFT/ReST, rlhf/ppo/distill.py) alone; `distill="best_of_n"` adds that
NLL to the ppo/grpo/rloo loss in the same optimizer steps. `off_policy_correction="tis"`
multiplies the surrogate by truncated importance weights toward the generator's
log-probs (rlhf/ppo/offpolicy.py). Steps 1 and 5, the snapshot and the stats path are the
same for every objective. Users' feedback (user_feedback; rlhf/learner/feedback_loss.py)
adds user_feedback_coef × its DPO/NLL loss, a slice per optimizer step, to whichever
objective runs (_optimizer_step).

On several ranks (rlhf/learner/distributed.py) the step is the same computation: every
rank has the batch and draws the same shuffles; each runs its share of the rows of the
behaviour pass (then all-reduced) and of every minibatch, whose losses are normalised by
the minibatch's global token or pair count, and the gradients are summed before clipping.
Rank 0's `step` first broadcasts the batch to the others, which wait in `follow`.

A step is all or nothing: if it raises, or ends with a non-finite loss, gradient norm or
KL (NonFiniteStep), the weights, optimizer, LR schedule, β and shuffle RNG are put back
as they were before it, so the caller can drop the batch and train on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any

import torch

from rlhf.learner.batch import RolloutBatch
from rlhf.learner.config import PPOConfig
from rlhf.learner.distributed import Commands, RankLost, Ranks
from rlhf.learner.feedback_loss import FeedbackBatch, FeedbackTerm
from rlhf.learner.policy import PolicyWithValueHead
from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    best_of_n_loss,
    best_of_n_targets,
    best_worst_pairs,
    broadcast_to_tokens,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    sequence_logprobs,
    tis_weights,
    value_loss,
)
from rlhf.ppo.masked import masked_sum, zero_padding

# Stats that are NaN/inf only when the update itself is (explained_variance is NaN by
# definition on a batch with constant returns, so it is not among them).
MUST_BE_FINITE = (
    "policy_loss",
    "value_loss",
    "dpo_loss",
    "kl_loss",
    "distill_loss",
    "grad_norm",
    "kl",
    "kl_coef_next",
    "reward_mean",
    "user_dpo_loss",
    "user_distill_loss",
)


class NonFiniteStep(ArithmeticError):
    """A PPO step whose loss, gradient or KL came out NaN or infinite; it was undone."""


def lr_lambda(cfg: PPOConfig):
    """Multiplier of cfg.lr after n optimizer steps: linear warm-up, then the schedule."""

    def factor(n: int) -> float:
        if n < cfg.warmup_steps:
            return (n + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (n - cfg.warmup_steps) / max(1, cfg.decay_steps))
        shape = 1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return factor


class PPOTrainer:
    def __init__(self, policy: PolicyWithValueHead, cfg: PPOConfig, ranks: Ranks | None = None):
        """`ranks`: the learner's ranks (rlhf/learner/distributed.py); None: one process."""
        if cfg.batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.micro_batch_size:
            raise ValueError(
                f"batch_size ({cfg.batch_size}) must be a multiple of minibatch_size ({cfg.minibatch_size}), "
                f"and that of micro_batch_size ({cfg.micro_batch_size})"
            )
        self.policy = policy
        self.cfg = cfg
        self.device = policy.device
        self.optimizer = torch.optim.AdamW(
            policy.trainable_parameters(),
            lr=cfg.lr,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.kl_ctl: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.steps = 0  # PPO steps taken (batches trained)
        self.ranks = ranks or Ranks.single()
        self.commands = Commands(self.ranks)  # rank 0's channel to the others

    def _autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (b, R, V), values (b, R)) of a (micro-)batch."""
        with self._autocast():
            return self.policy(
                mb.input_ids,
                mb.attention_mask,
                mb.position_ids,
                mb.prompt_width,
                mb.response_width,
                self.cfg.temperature,
            )

    def _chunks(self, rows: torch.Tensor, size: int):
        for start in range(0, rows.numel(), size):
            yield rows[start : start + size]

    @torch.no_grad()
    def _behaviour_pass(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π_θ (B, R), V (B, R) and per-token entropy (B, R) under the current weights,
        0 on padding (selected away, not multiplied: a non-finite padded slot stays out)."""
        logprobs = torch.zeros_like(batch.logprobs)
        values = torch.zeros_like(batch.logprobs)
        entropy = torch.zeros_like(batch.logprobs)
        mine = self.ranks.shard(torch.arange(batch.size, device=self.device))  # every row on one rank
        for rows in self._chunks(mine, self.cfg.micro_batch_size):
            mb = batch.select(rows)
            logits, v = self._forward(mb)
            r = mb.response_width
            logprobs[rows, :r] = logprobs_from_logits(logits, mb.response_ids)
            values[rows, :r] = v
            entropy[rows, :r] = entropy_from_logits(logits)
            del logits
        self.ranks.sum_(logprobs, values, entropy)  # the other ranks' rows: 0 here
        mask = batch.response_mask
        return zero_padding(logprobs, mask), zero_padding(values, mask), zero_padding(entropy, mask)

    def step(self, batch: RolloutBatch | None, feedback: FeedbackBatch | None = None) -> dict[str, float]:
        """Train on one batch; returns the step's diagnostics (floats, ready for metrics).

        `feedback`: users' examples (user_feedback; rlhf/learner/feedback_loss.py) whose loss,
        × user_feedback_coef, joins each optimizer step of the batch's objective. `batch`
        None: a step on the feedback alone (user_feedback_alone; `_feedback_alone`).
        All or nothing: on any exception (NonFiniteStep included) the trainer and the
        policy's trainable weights are as they were before the call. On rank 0 of several,
        the batch goes to the other ranks first (they run the same step in `follow`).
        """
        if not self.ranks.distributed:
            return self._all_or_nothing(batch, feedback)
        self.commands.send(
            Commands.STEP, None if batch is None else batch.to("cpu"), None if feedback is None else feedback.to("cpu")
        )
        return self._step_together(batch, feedback)

    def _step_together(self, batch: RolloutBatch | None, feedback: FeedbackBatch | None) -> dict[str, float]:
        """The step on one of several ranks. A NonFiniteStep comes from numbers every rank
        shares (summed losses, the gradient norm, the batch's KL), so every rank undoes the
        step and they train on together; any other failure may be this rank's alone (out
        of memory) and leaves the ranks' collectives out of step: RankLost, restart them all."""
        try:
            return self._all_or_nothing(batch, feedback)
        except NonFiniteStep:
            raise
        except Exception as e:
            self.ranks.broken = True
            raise RankLost(
                f"learner rank {self.ranks.rank}: PPO step failed ({type(e).__name__}: {str(e)[:300]}); "
                "the ranks are out of step, exiting so that every rank restarts"
            ) from e

    def _all_or_nothing(self, batch: RolloutBatch, feedback: FeedbackBatch | None) -> dict[str, float]:
        before = self._snapshot()
        try:
            stats = self._step(batch, feedback)
            bad = {k: stats[k] for k in MUST_BE_FINITE if k in stats and not math.isfinite(stats[k])}
            if bad:
                raise NonFiniteStep(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}")
            return stats
        except BaseException:
            self._restore(before)
            raise

    def _snapshot(self) -> dict[str, Any]:
        """What a step changes, copied: trainable weights (a LoRA adapter and the value
        head, or every weight with finetune="full"), optimizer moments, schedule, β, RNG."""
        return {
            "params": [p.detach().clone() for p in self.policy.trainable_parameters()],
            "optimizer": {
                p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()}
                for p, st in self.optimizer.state.items()
            },
            "lrs": [g["lr"] for g in self.optimizer.param_groups],
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "kl_ctl": copy.deepcopy(self.kl_ctl.state_dict()),
            "shuffle": self.shuffle.get_state(),
            "steps": self.steps,
        }

    @torch.no_grad()
    def _restore(self, snap: dict[str, Any]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p, saved in zip(self.policy.trainable_parameters(), snap["params"]):
            p.copy_(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(snap["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, snap["lrs"]):
            group["lr"] = lr
        self.scheduler.load_state_dict(snap["scheduler"])
        self.kl_ctl.load_state_dict(snap["kl_ctl"])
        self.shuffle.set_state(snap["shuffle"])
        self.steps = snap["steps"]

    def _step(self, batch: RolloutBatch | None, feedback_batch: FeedbackBatch | None = None) -> dict[str, float]:
        if batch is None:
            return self._feedback_alone(feedback_batch)
        cfg = self.cfg
        start = time.perf_counter()
        batch = batch.to(self.device)
        mask = batch.response_mask  # (B, R)
        feedback = (  # users' pairs and answers: π_ref of the pairs now, their loss in every optimizer step
            FeedbackTerm(feedback_batch, self.policy, self._forward, self._autocast, cfg, self.shuffle)
            if feedback_batch is not None
            else None
        )

        # 1. behaviour log-probs and values under the current weights
        current_logprobs, old_values, entropy = self._behaviour_pass(batch)
        old_logprobs = current_logprobs if cfg.old_logprobs == "recompute" else batch.logprobs

        kl_coef = self.kl_ctl.value  # β of this step; the controller updates after it
        if cfg.objective == "online_dpo":
            # 2-4. DPO on each group's best and worst response
            sums, weight, grad_norms, extra = self._dpo_epochs(batch, feedback)
        elif cfg.objective == "best_of_n":
            # 2-4. the NLL of each group's top response alone
            sums, weight, grad_norms, extra = self._distill_epochs(batch, feedback)
        else:
            # 2-3. advantages: GAE over KL-penalised rewards (ppo) or group-relative (grpo, rloo)
            if cfg.objective == "ppo":
                rewards = kl_penalized_rewards(
                    batch.scores, old_logprobs, batch.ref_logprobs, mask, kl_coef, cfg.kl_estimator
                )  # (B, R)
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)
                extra = {
                    "reward_mean": rewards.sum(-1).mean(),
                    "explained_variance": explained_variance(old_values, returns, mask),
                    "return_mean": masked_mean(returns, mask),
                }
            else:
                advantages, extra = self._group_advantages(batch, old_logprobs, kl_coef)
                returns = None
            # decoupled PPO: ratio against π_prox (old_logprobs, recomputed), weights toward π_behav
            token_weights = None
            if cfg.off_policy_correction == "tis":
                token_weights, tis_stats = tis_weights(old_logprobs, batch.logprobs, mask, cfg.tis_cap)
                extra.update(tis_stats)
            # best-of-n targets whose NLL joins the RL loss (distill="best_of_n")
            targets = None
            if cfg.distill == "best_of_n":
                targets, distill_stats = best_of_n_targets(batch.scores, batch.group_ids, cfg.distill_min_score)
                extra.update(distill_stats)
            # 4. K epochs over shuffled minibatches
            sums, weight, grad_norms, distill_extra = self._policy_epochs(
                batch, old_logprobs, old_values, advantages, returns, token_weights, kl_coef, targets, feedback
            )
            extra.update(distill_extra)
            extra["advantage_mean"] = masked_mean(advantages, mask)

        if feedback is not None:
            if not grad_norms:  # the objective took no optimizer step (all ties, no target): the users' loss alone
                grad_norms = self._feedback_epochs(feedback, 1)
            extra.update(feedback.stats())

        # 5. adaptive β from the measured sequence KL
        kl_per_token = kl_penalty(old_logprobs, batch.ref_logprobs, "k1")
        kl = masked_sum(kl_per_token, mask, dim=1).mean()
        self.kl_ctl.update(float(kl), batch.size)
        self.steps += 1

        stats: dict[str, Any] = {key: value / weight for key, value in sums.items()} if weight else {}
        stats.update(extra)
        stats.update(
            kl=kl,
            kl_coef=kl_coef,
            kl_coef_next=self.kl_ctl.value,
            score_mean=batch.scores.mean(),
            entropy=masked_mean(entropy, mask),
            response_length=mask.sum(-1).mean(),
            logprob_mismatch=masked_mean((batch.logprobs - current_logprobs).abs(), mask),
            grad_norm=torch.stack(grad_norms).mean() if grad_norms else 0.0,
            lr=self.scheduler.get_last_lr()[0],
        )
        return _step_out(stats, start, batch.num_tokens)

    def _feedback_alone(self, feedback_batch: FeedbackBatch | None) -> dict[str, float]:
        """A step on users' examples with no rollouts (user_feedback_alone): `ppo_epochs`
        epochs of their loss, each split over ceil(examples / minibatch_size) optimizer steps
        as a rollout batch is; no rollout objective, no KL measured, β left as it is (the
        drift gate measures each version's KL itself)."""
        if feedback_batch is None:
            raise ValueError("a step without rollouts needs users' feedback examples")
        cfg = self.cfg
        start = time.perf_counter()
        feedback = FeedbackTerm(feedback_batch, self.policy, self._forward, self._autocast, cfg, self.shuffle)
        examples = feedback_batch.n_pairs + feedback_batch.n_answers
        grad_norms = self._feedback_epochs(feedback, max(1, math.ceil(examples / cfg.minibatch_size)))
        self.steps += 1
        stats: dict[str, Any] = feedback.stats()
        stats.update(grad_norm=torch.stack(grad_norms).mean(), lr=self.scheduler.get_last_lr()[0])
        return _step_out(stats, start, feedback_batch.num_tokens)

    def _feedback_epochs(self, feedback: FeedbackTerm, parts: int) -> list[torch.Tensor]:
        """`ppo_epochs` epochs of the users' loss alone, each over `parts` optimizer steps;
        their gradient norms."""
        grad_norms = []
        for _ in range(self.cfg.ppo_epochs):
            for part in range(parts):
                self.optimizer.zero_grad(set_to_none=True)
                grad_norms.append(self._optimizer_step(feedback, part, parts))
        return grad_norms

    def _optimizer_step(self, feedback: FeedbackTerm | None, part: int, parts: int) -> torch.Tensor:
        """Add the users' loss of slice `part` of `parts` (if any) to the accumulated gradient,
        clip it, step the optimizer and the LR schedule; returns the norm before clipping."""
        params = self.policy.trainable_parameters()
        if feedback is not None:
            if self.ranks.leader:
                feedback.backward(part, parts)
            else:  # the same backward (the shuffle RNG must advance alike), but only rank 0's gradient counts
                kept = [p.grad for p in params]
                for p in params:
                    p.grad = None
                feedback.backward(part, parts)
                for p, g in zip(params, kept):
                    p.grad = g
        self.ranks.sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def _group_advantages(
        self, batch: RolloutBatch, old_logprobs: torch.Tensor, kl_coef: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, R) advantages of grpo or rloo, each response's broadcast to its tokens, and stats.

        With kl_in="reward" a response's reward is its score − β·Σ_t k(π_old, π_ref) (the
        sequence form of PPO's per-token penalty); with "loss" it is the score alone and
        the KL is a loss term (_policy_epochs).
        """
        cfg, mask = self.cfg, batch.response_mask
        rewards = batch.scores  # (B,)
        if cfg.kl_in == "reward":
            kl = kl_penalty(old_logprobs, batch.ref_logprobs, cfg.kl_estimator)  # (B, R)
            rewards = rewards - kl_coef * masked_sum(kl, mask, dim=1)
        advantage_fn = grpo_advantages if cfg.objective == "grpo" else rloo_advantages
        advantages, stats = advantage_fn(rewards, batch.group_ids)  # (B,)
        stats["reward_mean"] = rewards.mean()
        stats["groups"] = torch.tensor(float(torch.unique(batch.group_ids).numel()))
        return broadcast_to_tokens(advantages, mask), stats

    def _policy_epochs(
        self, batch, old_logprobs, old_values, advantages, returns, token_weights, kl_coef, targets=None, feedback=None
    ) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor], dict[str, Any]]:
        """Step 4 for the policy-gradient objectives: clipped surrogate (times the TIS weights),
        plus the value loss (ppo) or β·k3 (kl_in="loss"), plus distill_coef × the best-of-n
        NLL of the `targets` rows (B,) bool, if given. Returns (token-weighted stat sums,
        their weight, gradient norms, distill_loss over the epochs when distilling).

        The NLL is weighted by target tokens: each micro-batch adds its targets' token sum
        over the minibatch's target tokens, so a minibatch's pieces sum to its targets'
        token mean (as the RL loss's sum to its token mean); a minibatch without a target
        adds nothing."""
        cfg, mask = self.cfg, batch.response_mask
        with_critic = cfg.objective == "ppo"
        kl_in_loss = cfg.kl_in == "loss"
        target_mask = None if targets is None else mask * targets.unsqueeze(-1).to(mask.dtype)  # (B, R)
        sums: dict[str, torch.Tensor] = {}
        weight = 0.0
        distill_sum, distill_tokens = 0.0, 0.0
        grad_norms = []
        parts = math.ceil(batch.size / cfg.minibatch_size)  # optimizer steps per epoch
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(batch.size, generator=self.shuffle).to(self.device)
            for part, minibatch in enumerate(self._chunks(order, cfg.minibatch_size)):
                minibatch_tokens = mask[minibatch].sum().clamp_min(1.0)
                if target_mask is not None:
                    minibatch_target_tokens = target_mask[minibatch].sum().clamp_min(1.0)
                self.optimizer.zero_grad(set_to_none=True)
                for rows in self._chunks(self.ranks.shard(minibatch), cfg.micro_batch_size):
                    mb = batch.select(rows)
                    r = mb.response_width
                    mb_mask = mb.response_mask
                    logits, values = self._forward(mb)
                    logprobs = logprobs_from_logits(logits, mb.response_ids)  # (b, r)
                    loss, mb_stats = policy_loss(
                        logprobs,
                        old_logprobs[rows, :r],
                        advantages[rows, :r],
                        mb_mask,
                        cfg.clip_eps,
                        token_weights=None if token_weights is None else token_weights[rows, :r],
                    )
                    if with_critic:
                        vf_loss, vf_stats = value_loss(
                            values, old_values[rows, :r], returns[rows, :r], mb_mask, cfg.value_clip_eps
                        )
                        loss = loss + cfg.vf_coef * vf_loss
                        mb_stats = mb_stats | vf_stats
                    if kl_in_loss:  # DeepSeekMath eq. 3: β·D_KL by k3 of the current policy, per token
                        kl_loss = masked_mean(kl_penalty(logprobs, mb.ref_logprobs, "k3"), mb_mask)
                        loss = loss + kl_coef * kl_loss
                        mb_stats["kl_loss"] = kl_loss.detach()
                    if cfg.ent_coef:
                        loss = loss - cfg.ent_coef * masked_mean(entropy_from_logits(logits), mb_mask)
                    # token-weighted: the micro-batches' sum is the minibatch's token mean
                    tokens = mb_mask.sum()
                    loss = loss * tokens / minibatch_tokens
                    if target_mask is not None:  # RAFT/ReST NLL in the same backward, by target tokens
                        nll, _ = best_of_n_loss(logprobs, mb_mask, targets[rows])
                        nll_tokens = target_mask[rows, :r].sum()
                        loss = loss + cfg.distill_coef * nll * nll_tokens / minibatch_target_tokens
                        distill_sum = distill_sum + nll.detach() * nll_tokens
                        distill_tokens = distill_tokens + nll_tokens
                    loss.backward()
                    for key, value in mb_stats.items():
                        sums[key] = sums.get(key, 0.0) + value * tokens
                    weight = weight + tokens
                    del logits, values, logprobs, loss
                grad_norms.append(self._optimizer_step(feedback, part, parts))
        sums, weight, distill_sum, distill_tokens = self._sum_over_ranks(sums, weight, distill_sum, distill_tokens)
        extra = {}
        if target_mask is not None:
            extra["distill_loss"] = distill_sum / distill_tokens if distill_tokens else 0.0
        return sums, weight, grad_norms, extra

    def _distill_epochs(
        self, batch: RolloutBatch, feedback: FeedbackTerm | None = None
    ) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor], dict[str, Any]]:
        """Steps 2-4 of best_of_n (RAFT, Dong et al. 2023; ReST, Gulcehre et al. 2023): each
        group's top response by RM score, if it clears distill_min_score, is a target; K
        epochs over shuffled minibatches of targets (minibatch_size and micro_batch_size
        count targets) of distill_coef × their token-mean NLL. Only the targets go through
        the model. A batch without a target takes no optimizer step."""
        cfg, mask = self.cfg, batch.response_mask
        targets, extra = best_of_n_targets(batch.scores, batch.group_ids, cfg.distill_min_score)
        rows_of_targets = targets.nonzero().squeeze(-1)  # (N,)
        everything = torch.ones_like(targets)
        sums: dict[str, torch.Tensor] = {}
        weight = 0.0
        grad_norms = []
        n = rows_of_targets.numel()
        parts = math.ceil(n / cfg.minibatch_size)
        for _ in range(cfg.ppo_epochs if n else 0):
            order = rows_of_targets[torch.randperm(n, generator=self.shuffle).to(self.device)]
            for part, minibatch in enumerate(self._chunks(order, cfg.minibatch_size)):
                minibatch_tokens = mask[minibatch].sum().clamp_min(1.0)
                self.optimizer.zero_grad(set_to_none=True)
                for rows in self._chunks(self.ranks.shard(minibatch), cfg.micro_batch_size):
                    mb = batch.select(rows)
                    logits, _ = self._forward(mb)
                    logprobs = logprobs_from_logits(logits, mb.response_ids)  # (b, r)
                    nll, mb_stats = best_of_n_loss(logprobs, mb.response_mask, everything[rows])
                    tokens = mb.response_mask.sum()
                    (cfg.distill_coef * nll * tokens / minibatch_tokens).backward()
                    for key, value in mb_stats.items():
                        sums[key] = sums.get(key, 0.0) + value * tokens
                    weight = weight + tokens
                    del logits, logprobs, nll
                grad_norms.append(self._optimizer_step(feedback, part, parts))
        sums, weight = self._sum_over_ranks(sums, weight)
        extra.update(reward_mean=batch.scores.mean(), groups=float(torch.unique(batch.group_ids).numel()))
        if not n:
            extra["distill_loss"] = 0.0
        return sums, weight, grad_norms, extra

    def _dpo_epochs(
        self, batch: RolloutBatch, feedback: FeedbackTerm | None = None
    ) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor], dict[str, Any]]:
        """Steps 2-4 of online_dpo (Guo et al. 2024): one (best, worst) pair per group by RM
        score, K epochs over shuffled minibatches of pairs, the DPO loss (Rafailov et al.
        2023) on summed response log-probs against the rollout's log π_ref. A pair's two
        rows always share a micro-batch (minibatch_size / 2 and micro_batch_size / 2 pairs,
        at least one). A batch of ties takes no optimizer step."""
        cfg, mask = self.cfg, batch.response_mask
        pairs = best_worst_pairs(batch.scores, batch.group_ids)  # (P, 2) rows [chosen, rejected]
        ref_seq = sequence_logprobs(batch.ref_logprobs, mask)  # (B,)
        groups = int(torch.unique(batch.group_ids).numel())
        sums: dict[str, torch.Tensor] = {}
        weight = 0.0
        grad_norms = []
        n_pairs = pairs.shape[0]
        parts = math.ceil(n_pairs / max(1, cfg.minibatch_size // 2))
        for _ in range(cfg.ppo_epochs if n_pairs else 0):
            order = torch.randperm(n_pairs, generator=self.shuffle).to(self.device)
            for part, minibatch in enumerate(self._chunks(order, max(1, cfg.minibatch_size // 2))):
                self.optimizer.zero_grad(set_to_none=True)
                for micro in self._chunks(self.ranks.shard(minibatch), max(1, cfg.micro_batch_size // 2)):
                    rows = pairs[micro].reshape(-1)  # (2p,) chosen, rejected, chosen, …
                    mb = batch.select(rows)
                    logits, _ = self._forward(mb)
                    seq = sequence_logprobs(logprobs_from_logits(logits, mb.response_ids), mb.response_mask)
                    loss, mb_stats = dpo_loss(
                        seq[0::2], seq[1::2], ref_seq[rows[0::2]], ref_seq[rows[1::2]], cfg.dpo_beta
                    )
                    share = micro.numel() / minibatch.numel()  # pair-weighted: sums to the minibatch mean
                    (loss * share).backward()
                    for key, value in mb_stats.items():
                        sums[key] = sums.get(key, 0.0) + value * micro.numel()
                    weight = weight + micro.numel()
                    del logits, seq, loss
                grad_norms.append(self._optimizer_step(feedback, part, parts))
        sums, weight = self._sum_over_ranks(sums, weight)
        extra = {
            "dpo_pairs": float(n_pairs),
            "dpo_ties_skipped": float(groups - n_pairs),
            "reward_mean": batch.scores.mean(),
            "groups": float(groups),
        }
        if not n_pairs:
            extra["dpo_loss"] = 0.0
        return sums, weight, grad_norms, extra

    def _sum_over_ranks(self, sums: dict[str, Any], weight: Any, *more: Any) -> tuple[Any, ...]:
        """(sums, weight, *more) over every rank's rows: a step's weighted stat sums, on every rank."""
        if not self.ranks.distributed:
            return (sums, weight, *more)
        named = {f"sum.{k}": v for k, v in sums.items()} | {"weight": weight}
        total = self.ranks.sum_floats(named | {f"more.{i}": v for i, v in enumerate(more)})
        out = {k.removeprefix("sum."): v for k, v in total.items() if k.startswith("sum.")}
        return (out, total["weight"], *(total[f"more.{i}"] for i in range(len(more))))

    # --- the other ranks (rlhf/learner/distributed.py) --------------------------------

    def share_state(self) -> None:
        """Rank 0: make every rank's trainable weights and trainer state this rank's (after a
        checkpoint restore, a revert or a rollback). A no-op on one rank."""
        if not self.ranks.distributed:
            return
        self.commands.send(Commands.STATE)
        self._receive_state()

    def _receive_state(self) -> None:
        self.ranks.broadcast_(self.policy.trainable_parameters())
        state = self.ranks.broadcast_object(_to_cpu(self.state_dict()) if self.ranks.leader else None)
        if not self.ranks.leader:
            self.load_state_dict(state)  # an empty optimizer state (fresh, or reset) empties this one too

    def keep_alive(self) -> None:
        """Rank 0, while it trains nothing: tell the waiting ranks it is alive."""
        self.commands.keep_alive()

    def release(self) -> None:
        """Rank 0, at shutdown: tell the other ranks to exit, and leave the process group."""
        if self.ranks.distributed and not self.ranks.broken:
            try:
                self.commands.send(Commands.STOP)
            except RankLost as e:  # they are gone already: nothing to tell
                logging.getLogger(__name__).warning("the other ranks did not take the stop", extra={"error": str(e)})
        self.ranks.close()

    def follow(self) -> None:
        """A rank other than 0: run rank 0's commands until it says stop (_step_together:
        a non-finite step is undone here as there; a lost rank raises RankLost)."""
        log = logging.getLogger(__name__)
        while True:
            kind, *payload = self.ranks.broadcast_object()
            if kind == Commands.STEP:
                batch, feedback = payload
                try:
                    self._step_together(batch, feedback)
                except NonFiniteStep as e:  # on rank 0 too: it dead-letters the batch
                    log.warning("PPO step undone on every rank", extra={"error": str(e)})
            elif kind == Commands.STATE:
                self._receive_state()
            elif kind == Commands.STOP:
                self.ranks.close()
                return

    # --- checkpoint state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the policy weights (those go to safetensors files)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.shuffle.set_state(state["shuffle_rng"])
        self.steps = int(state["steps"])

    def reset_optimizer(self) -> None:
        """Forget Adam's moments (after a rollback the old trajectory's momentum is wrong)."""
        self.optimizer.state.clear()


def _to_cpu(obj: Any) -> Any:
    """A copy of a nested state dict with its tensors on the CPU (to pickle between ranks)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _step_out(stats: dict[str, Any], start: float, tokens: int) -> dict[str, float]:
    """A step's diagnostics as floats (one device sync for the whole step), with its time
    since `start` and its throughput over `tokens`."""
    out = {k: float(v) for k, v in stats.items()}
    out["step_seconds"] = time.perf_counter() - start
    out["tokens"] = float(tokens)
    out["tokens_per_second"] = out["tokens"] / out["step_seconds"]
    return out
