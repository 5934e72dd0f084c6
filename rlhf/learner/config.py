"""The learner's hyper-parameters: one documented field each, defaults from the peers.

`PPOConfig` is a plain pydantic model so the trainer can be built in a test or a benchmark
without the service; the service's settings class inherits it, so every field is also an
`RLHF_<NAME>` environment variable and a `--<name>` flag.

Defaults: TRL (γ=1, λ=0.95, ε=0.2, ε_v=0.2, vf_coef=0.1, k1 in the reward), OpenRLHF
(micro-batching, token-weighted losses), Ziegler et al. 2019 (adaptive β: target 6 nats,
horizon 10 000 episodes) — scaled down where those assume long responses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PPOConfig(BaseModel):
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


class LearnerConfig(PPOConfig):
    """The learner process around the PPO step: Kafka, checkpoints, versions, drift gate."""

    group_id: str = Field("learner", description="Kafka consumer group of the rollout consumer")
    device: str = Field("auto", description='"auto" (cuda if present), "cpu" or "cuda[:n]"')
    torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default")
    max_buffered_rollouts: int = Field(256, description="rollouts held in memory before polling pauses")
    checkpoint_every: int = Field(1, description="PPO steps between checkpoints (Kafka commits follow them)")
    keep_checkpoints: int = Field(2, description="checkpoints kept on disk")
    publish_every: int = Field(1, description="PPO steps per new policy version")
    weight_store_dir: str = Field("", description="weight store folder; empty: <state_dir>/weights")
    drift_kl_budget: float = Field(
        5.0, description="drift gate: largest KL(π_new‖π_ref) per held-out response, nats, still promoted"
    )
    drift_prompts_file: str = Field(
        "", description="held-out prompts, one per line; empty: a built-in set of 8 generic prompts"
    )
    drift_max_new_tokens: int = Field(32, description="drift gate: tokens sampled per held-out response")
    drift_samples_per_prompt: int = Field(2, description="drift gate: responses sampled per held-out prompt")
    on_reject: Literal["revert", "continue"] = Field(
        "revert",
        description="after a rejected version: go back to the serving version's weights (its rollouts stay "
        "on-policy) or keep training from the rejected weights",
    )
