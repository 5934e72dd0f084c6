"""One PPO step on a batch of rollouts (InstructGPT stage 3, the seed's "PPO optimisation").

The rollout brings the tokens, the RM score and log π_ref; the learner brings the critic.
A step is cleanrl's loop over a batch that arrived from Kafka instead of from env.step():

  1. log π_old and V_old under the current weights (one no-grad pass)
  2. KL-penalised per-token rewards  r_t = −β·kl_t (+ score at the last token)
  3. GAE advantages and returns, advantages whitened over the batch
  4. K epochs × shuffled minibatches of the clipped policy + value loss, gradient
     accumulation over micro-batches, global-norm clipping, LR schedule
  5. adaptive β from the batch's KL (Ziegler et al. 2019)
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from rlhf.learner.batch import RolloutBatch
from rlhf.learner.config import PPOConfig
from rlhf.learner.policy import PolicyWithValueHead
from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from rlhf.ppo.masked import masked_sum


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
    def __init__(self, policy: PolicyWithValueHead, cfg: PPOConfig):
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

    def _autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (b, R, V), values (b, R)) of a (micro-)batch."""
        with self._autocast():
            return self.policy(
                mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_width, mb.response_width,
                self.cfg.temperature,
            )

    def _chunks(self, rows: torch.Tensor, size: int):
        for start in range(0, rows.numel(), size):
            yield rows[start : start + size]

    @torch.no_grad()
    def _behaviour_pass(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π_θ (B, R), V (B, R) and per-token entropy (B, R) under the current weights."""
        logprobs = torch.zeros_like(batch.logprobs)
        values = torch.zeros_like(batch.logprobs)
        entropy = torch.zeros_like(batch.logprobs)
        for rows in self._chunks(torch.arange(batch.size, device=self.device), self.cfg.micro_batch_size):
            mb = batch.select(rows)
            logits, v = self._forward(mb)
            r = mb.response_width
            logprobs[rows, :r] = logprobs_from_logits(logits, mb.response_ids)
            values[rows, :r] = v
            entropy[rows, :r] = entropy_from_logits(logits)
            del logits
        mask = batch.response_mask
        return logprobs * mask, values * mask, entropy * mask

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """Train on one batch; returns the step's diagnostics (floats, ready for metrics)."""
        cfg = self.cfg
        start = time.perf_counter()
        batch = batch.to(self.device)
        mask = batch.response_mask  # (B, R)

        # 1. behaviour log-probs and values under the current weights
        current_logprobs, old_values, entropy = self._behaviour_pass(batch)
        old_logprobs = current_logprobs if cfg.old_logprobs == "recompute" else batch.logprobs

        # 2. KL-penalised rewards (β of this step; the controller updates after it)
        kl_coef = self.kl_ctl.value
        rewards = kl_penalized_rewards(
            batch.scores, old_logprobs, batch.ref_logprobs, mask, kl_coef, cfg.kl_estimator
        )  # (B, R)

        # 3. advantages and returns
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 4. K epochs over shuffled minibatches
        sums: dict[str, torch.Tensor] = {}
        weight = 0.0
        grad_norms = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(batch.size, generator=self.shuffle).to(self.device)
            for minibatch in self._chunks(order, cfg.minibatch_size):
                minibatch_tokens = mask[minibatch].sum().clamp_min(1.0)
                self.optimizer.zero_grad(set_to_none=True)
                for rows in self._chunks(minibatch, cfg.micro_batch_size):
                    mb = batch.select(rows)
                    r = mb.response_width
                    mb_mask = mb.response_mask
                    logits, values = self._forward(mb)
                    logprobs = logprobs_from_logits(logits, mb.response_ids)  # (b, r)
                    pg_loss, pg_stats = policy_loss(
                        logprobs, old_logprobs[rows, :r], advantages[rows, :r], mb_mask, cfg.clip_eps
                    )
                    vf_loss, vf_stats = value_loss(
                        values, old_values[rows, :r], returns[rows, :r], mb_mask, cfg.value_clip_eps
                    )
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.ent_coef:
                        loss = loss - cfg.ent_coef * masked_mean(entropy_from_logits(logits), mb_mask)
                    # token-weighted: the micro-batches' sum is the minibatch's token mean
                    tokens = mb_mask.sum()
                    (loss * tokens / minibatch_tokens).backward()
                    for key, value in (pg_stats | vf_stats).items():
                        sums[key] = sums.get(key, 0.0) + value * tokens
                    weight = weight + tokens
                    del logits, values, logprobs, loss
                grad_norms.append(
                    torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.max_grad_norm)
                )
                self.optimizer.step()
                self.scheduler.step()

        # 5. adaptive β from the measured sequence KL
        kl_per_token = kl_penalty(old_logprobs, batch.ref_logprobs, "k1")
        kl = masked_sum(kl_per_token, mask, dim=1).mean()
        self.kl_ctl.update(float(kl), batch.size)
        self.steps += 1

        stats: dict[str, Any] = {key: value / weight for key, value in sums.items()}
        stats.update(
            kl=kl,
            kl_coef=kl_coef,
            kl_coef_next=self.kl_ctl.value,
            score_mean=batch.scores.mean(),
            reward_mean=rewards.sum(-1).mean(),
            entropy=masked_mean(entropy, mask),
            explained_variance=explained_variance(old_values, returns, mask),
            advantage_mean=masked_mean(advantages, mask),
            return_mean=masked_mean(returns, mask),
            response_length=mask.sum(-1).mean(),
            logprob_mismatch=masked_mean((batch.logprobs - current_logprobs).abs(), mask),
            grad_norm=torch.stack(grad_norms).mean(),
            lr=self.scheduler.get_last_lr()[0],
        )
        out = {k: float(v) for k, v in stats.items()}  # one device sync for the whole step
        out["step_seconds"] = time.perf_counter() - start
        out["tokens"] = float(batch.num_tokens)
        out["tokens_per_second"] = out["tokens"] / out["step_seconds"]
        return out

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
