"""The learner's hyper-parameters: one documented field each, defaults from the peers.

`PPOConfig` is a plain pydantic model so the trainer can be built in a test or a benchmark
without the service; the learner service carries every field of `LearnerConfig` as a setting
`learner_<name>` (an `RLHF_LEARNER_<NAME>` environment variable, a `--learner-<name>` flag) and
builds the config back from them (rlhf.serving.settings.config_from). The learner owns
`batch_size × publish_every` (rollouts per version), `max_policy_lag` and `temperature`: it
announces them to the rollout workers in every PolicyUpdate.

Defaults: TRL (γ=1, λ=0.95, ε=0.2, ε_v=0.2, vf_coef=0.1, k1 in the reward), OpenRLHF
(micro-batching, token-weighted losses), Ziegler et al. 2019 (adaptive β: target 6 nats,
horizon 10 000 episodes) — scaled down where those assume long responses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from rlhf.tracking import TRACKING_HELP, validate_tracking

GROUP_OBJECTIVES = ("grpo", "rloo", "online_dpo", "best_of_n")  # trained on whole rollout groups (Rollout.group_id)
DISTILL_MIXES_WITH = ("ppo", "grpo", "rloo")  # objectives distill="best_of_n" adds its loss to


class PPOConfig(BaseModel):
    # --- objective ---------------------------------------------------------------------
    objective: Literal["ppo", "grpo", "rloo", "online_dpo", "best_of_n"] = Field(
        "ppo",
        description="ppo (critic + GAE), grpo or rloo (group-relative advantages over a prompt's n samples, no "
        "critic), online_dpo (DPO on the best and worst sample of each group by RM score), best_of_n (only the "
        "distillation loss on each group's top sample, RAFT/ReST); all but ppo train on whole rollout groups",
    )
    kl_in: Literal["reward", "loss"] = Field(
        "reward",
        description="grpo/rloo: KL to π_ref as −β·KL in each response's reward, or as the loss term β·k3(π_θ, π_ref) "
        "(DeepSeekMath); ppo always has it in the reward, online_dpo in the DPO loss itself",
    )
    dpo_beta: float = Field(
        0.1,
        description="β of the DPO loss (Rafailov et al. 2023): online_dpo's, and user_feedback=dpo's on users' pairs",
    )
    off_policy_correction: Literal["none", "tis"] = Field(
        "none",
        description="none: ratio against the recomputed π_old as if the rollout were on-policy; tis: decoupled PPO "
        "(AReaL) with truncated importance weights min(π_prox/π_behav, tis_cap) toward the generator's log-probs",
    )
    tis_cap: float = Field(2.0, description="off_policy_correction=tis: truncation C of the importance weight")
    distill: Literal["none", "best_of_n"] = Field(
        "none",
        description="best_of_n: add the NLL of each group's top-scored response (RAFT/ReST) to the ppo/grpo/rloo "
        "loss in the same optimizer step (objective=best_of_n trains that loss alone)",
    )
    distill_coef: float = Field(
        1.0,
        description="distill=best_of_n: weight of the best-of-n NLL (nats per target token) beside the RL loss "
        "(alone, Adam ignores a loss's scale: lr sets the step)",
    )
    distill_min_score: float | None = Field(
        None,
        description="best-of-n: a group's top response is a target only if its RM score is above this; unset: "
        "above its group's mean score (a group of equal scores teaches nothing)",
    )

    # --- users' own feedback (rlhf.feedback; rlhf/learner/feedback.py) -----------------------
    user_feedback: Literal["none", "dpo", "distill", "both"] = Field(
        "none",
        description="train the policy on users' Feedback events too: dpo (the DPO loss on each comparison, "
        "chosen over rejected, against the in-process π_ref), distill (the NLL of thumbs-up answers and "
        "corrected_answers), both; none: the learner does not read rlhf.feedback (the reward model still learns "
        "from it)",
    )
    user_feedback_coef: float = Field(
        0.5,
        description="user_feedback: weight of the users' DPO loss and of their answers' NLL (nats per token) beside "
        "the rollout objective's loss, in each of the step's optimizer steps",
    )
    user_feedback_max_per_step: int = Field(
        16, description="user_feedback: most Feedback events whose examples join one learner step (oldest first)"
    )
    user_feedback_alone: bool = Field(
        False,
        description="user_feedback: when user_feedback_max_per_step events are buffered and no rollout batch is "
        "ready, a step on them alone (online DPO / SFT on users' own feedback): the policy learns from people "
        "before the reward model has the comparisons rollouts wait for, and between rollout batches",
    )
    user_feedback_max_prompt_tokens: int = Field(
        1024,
        description="user_feedback: a Feedback event whose prompt, rendered by the chat template, is longer is "
        "dead-lettered (too_long)",
    )
    user_feedback_max_answer_tokens: int = Field(
        512,
        description="user_feedback: a Feedback event with an answer (chosen, rejected, rated or corrected) longer "
        "than this many tokens is dead-lettered (too_long)",
    )

    # --- model -------------------------------------------------------------------------
    finetune: Literal["lora", "full"] = Field("lora", description="train a LoRA adapter (peft) or every weight")
    lora_r: int = Field(8, description="LoRA rank")
    lora_alpha: int = Field(16, description="LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, description="LoRA dropout; 0 keeps old and new log-probs comparable")
    lora_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names LoRA wraps"
    )
    temperature: float = Field(1.0, description="sampling temperature of the rollouts; logits are divided by it")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16 autocast for forward passes (fp32 weights and optimizer)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")

    # --- batches -----------------------------------------------------------------------
    batch_size: int = Field(16, description="rollouts per PPO step")
    minibatch_size: int = Field(8, description="rollouts per optimizer step")
    micro_batch_size: int = Field(8, description="rollouts per forward/backward (gradient accumulation below it)")
    ppo_epochs: int = Field(4, description="K: passes over the batch, each in a fresh shuffle")
    max_policy_lag: int = Field(
        2, description="drop rollouts generated more than this many versions before the current one"
    )

    # --- PPO ---------------------------------------------------------------------------
    clip_eps: float = Field(0.2, description="ε of the clipped surrogate")
    value_clip_eps: float = Field(0.2, description="ε_v of the clipped value loss")
    vf_coef: float = Field(0.1, description="weight of the value loss")
    ent_coef: float = Field(0.0, description="weight of the entropy bonus (0: entropy only reported)")
    gamma: float = Field(1.0, description="GAE discount γ")
    lam: float = Field(0.95, description="GAE λ")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch's response tokens")
    old_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="π_old for the ratio: recompute under the learner's weights (the critic needs that "
        "forward anyway; immune to engine numerics) or trust the generator's",
    )

    # --- KL control --------------------------------------------------------------------
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator in the reward")
    kl_coef: float = Field(0.05, description="initial β")
    adaptive_kl: bool = Field(True, description="adapt β toward kl_target (Ziegler et al. 2019); else fixed")
    kl_target: float = Field(1.0, description="target KL(π‖π_ref) per response, nats")
    kl_horizon: float = Field(10_000, description="adaptive-β horizon, in rollouts")

    # --- optimisation ------------------------------------------------------------------
    lr: float = Field(1e-4, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    adam_eps: float = Field(1e-8, description="AdamW ε")
    max_grad_norm: float = Field(1.0, description="clip the global gradient norm to this")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="shape after warm-up (an online learner has no natural end)"
    )
    warmup_steps: int = Field(0, description="optimizer steps of linear warm-up from 0")
    decay_steps: int = Field(1000, description="optimizer steps over which linear/cosine decay to min_lr_ratio")
    min_lr_ratio: float = Field(0.1, description="floor of the decay, as a fraction of lr")
    seed: int = Field(0, description="seed of the minibatch shuffles and of LoRA's initial A matrices")

    @model_validator(mode="after")
    def _objective_settings(self) -> PPOConfig:
        # errors name the setting and what to set it to: they are what `rlhf up` prints
        if self.kl_in == "loss" and self.objective not in ("grpo", "rloo"):
            raise ValueError(
                f"kl_in='loss' applies to objective grpo or rloo, not {self.objective!r}: set kl_in='reward'"
            )
        if self.off_policy_correction == "tis":
            if self.old_logprobs != "recompute":
                raise ValueError(
                    "off_policy_correction='tis' needs old_logprobs='recompute' (the proximal policy "
                    "is the recomputed one; with 'rollout' every weight would be 1)"
                )
            if self.objective == "online_dpo":
                raise ValueError(
                    "off_policy_correction='tis' corrects a policy-gradient ratio; online_dpo has none: "
                    "set off_policy_correction='none'"
                )
        if self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        if self.dpo_beta <= 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if self.distill == "best_of_n" and self.objective not in DISTILL_MIXES_WITH + ("best_of_n",):
            raise ValueError(
                f"distill='best_of_n' mixes with objective ppo, grpo or rloo, not {self.objective!r}: "
                "set distill='none', or objective='best_of_n' to train the distillation loss alone"
            )
        if self.objective == "best_of_n" and self.off_policy_correction == "tis":
            raise ValueError(
                "off_policy_correction='tis' corrects a policy-gradient ratio; best_of_n has none: "
                "set off_policy_correction='none'"
            )
        if self.objective == "best_of_n" and self.distill_coef != 1.0:
            raise ValueError(
                f"distill_coef ({self.distill_coef}) weighs the distillation loss against an RL loss; "
                "objective='best_of_n' trains it alone and Adam's step ignores a loss's scale: leave "
                "distill_coef=1 and set lr to slow it"
            )
        if self.distills and self.distill_coef <= 0:
            raise ValueError(
                f"distill_coef must be > 0 when distilling, got {self.distill_coef}: to train without "
                "the distillation loss set distill='none'"
            )
        if self.user_feedback != "none":
            if self.user_feedback_coef <= 0:
                raise ValueError(
                    f"user_feedback_coef must be > 0 when user_feedback={self.user_feedback!r}, got "
                    f"{self.user_feedback_coef}: to train without users' feedback set user_feedback='none'"
                )
            for name in (
                "user_feedback_max_per_step",
                "user_feedback_max_prompt_tokens",
                "user_feedback_max_answer_tokens",
            ):
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"{name} must be ≥ 1 when user_feedback={self.user_feedback!r}, got {getattr(self, name)}"
                    )
        elif self.user_feedback_alone:
            raise ValueError(
                "user_feedback_alone=True trains steps on users' Feedback events, which user_feedback='none' does "
                "not read: set user_feedback (dpo, distill or both) or user_feedback_alone=False"
            )
        return self

    @property
    def distills(self) -> bool:
        """The step has the best-of-n loss: alone (objective=best_of_n) or beside an RL objective."""
        return self.objective == "best_of_n" or self.distill == "best_of_n"

    @property
    def whole_groups(self) -> bool:
        """Batches made of whole rollout groups (the group objectives compare a group's samples;
        best-of-n distillation picks each group's top one, also beside ppo)."""
        return self.objective in GROUP_OBJECTIVES or self.distills


class LearnerConfig(PPOConfig):
    """The learner process around the PPO step: Kafka, checkpoints, versions, drift gate."""

    group_id: str = Field("learner", description="Kafka consumer group of the rollout consumer")
    device: str = Field("auto", description='"auto" (cuda if present), "cpu" or "cuda[:n]"')
    torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default")
    dist_timeout_seconds: float = Field(
        600.0,
        description="torchrun-launched ranks (rlhf/learner/distributed.py): torch.distributed's collective timeout; "
        "a rank that stops answering fails the others after this (a dead one at once), and rank 0 sends a "
        "keep-alive every quarter of it while it trains nothing",
    )
    max_buffered_rollouts: int = Field(256, description="rollouts held in memory before polling pauses")
    checkpoint_every: int = Field(1, description="PPO steps between checkpoints (Kafka commits follow them)")
    keep_checkpoints: int = Field(2, description="checkpoints kept on disk")
    publish_every: int = Field(1, description="PPO steps per new policy version")
    drift_kl_budget: float = Field(
        5.0, description="drift gate: largest KL(π_new‖π_ref) per held-out response, nats, still promoted"
    )
    drift_prompts_file: str = Field(
        "",
        description="held-out prompts: a text file, one per line, or .jsonl prompt records (rlhf.prompts); "
        "empty: a built-in set of 8 generic prompts",
    )
    drift_max_new_tokens: int = Field(32, description="drift gate: tokens sampled per held-out response")
    drift_samples_per_prompt: int = Field(2, description="drift gate: responses sampled per held-out prompt")
    on_reject: Literal["revert", "continue"] = Field(
        "revert",
        description="after a rejected version: go back to the serving version's weights (its rollouts stay "
        "on-policy) or keep training from the rejected weights",
    )
    tracking: str = Field("tensorboard", description=TRACKING_HELP)  # rlhf/tracking.py

    @field_validator("tracking")
    @classmethod
    def _tracking(cls, v: str) -> str:
        return validate_tracking(v)
