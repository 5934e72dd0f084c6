"""The reward model's training settings: one documented field each.

Plain pydantic models, so a test or a benchmark builds a trainer without the service; the
reward service carries every field as a setting `reward_<name>` (`RLHF_REWARD_LR=1e-5`,
`--reward-lr 1e-5`) and builds these back from them (rlhf.serving.settings.config_from).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf.tracking import TRACKING_HELP, validate_tracking

LENGTH_DEBIAS = ("none", "odin")


class TrainerConfig(BaseModel):
    """One online RM step (rlhf.reward.trainer.OnlineRewardTrainer)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(2e-5, description="AdamW learning rate of the RM")
    weight_decay: float = Field(0.0, description="AdamW weight decay of the RM")
    train_batch_size: int = Field(16, description="new examples per training step")
    replay_ratio: float = Field(1.0, description="replayed examples mixed in per new example")
    replay_size: int = Field(20_000, description="examples kept in the replay buffer")
    max_grad_norm: float = Field(1.0, description="gradient clipping norm (global L2)")
    accuracy_window: int = Field(512, description="validated examples the online accuracy averages over")
    norm_window: float = Field(10_000, description="effective memory of the score normaliser, in scores")
    norm_clip: float = Field(5.0, description="normalised scores are clipped to ±this")
    dedup_capacity: int = Field(200_000, description="feedback event ids remembered for de-duplication")
    max_prompt_chars: int = Field(
        16_000,
        description="most characters in one item's prompt (all messages); "
        "feedback with a longer prompt is dead-lettered",
    )
    max_response_chars: int = Field(
        8_000, description="most characters in one item's response; feedback with a longer answer is dead-lettered"
    )
    seed: int = Field(0, description="seed of the RM head initialisation and replay sampling")
    length_debias: Literal["none", "odin"] = Field(
        "none",
        description='"none", or "odin": a length head trained to carry response length and a quality head '
        "decorrelated from it (Chen et al. 2024); Score serves the quality head. docs/reward.md",
    )
    odin_length_weight: float = Field(1.0, description="length_debias=odin: weight of the |ρ(r_Q, L)| − ρ(r_L, L) term")
    odin_ortho_weight: float = Field(1.0, description="length_debias=odin: weight of the |w_Q · w_L| term")
    label_noise: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="noise-aware Bradley-Terry: the assumed probability ε that a comparison label is flipped, "
        "P(a ≻ b) = ε + (1 − 2ε) σ(r_a − r_b) (Natarajan et al. 2013); 0: the plain loss. docs/feedback.md",
    )

    @field_validator("length_debias", mode="before")
    @classmethod
    def _known_debias(cls, v: object) -> object:
        if v not in LENGTH_DEBIAS:
            raise ValueError(f"length_debias={v!r}: use one of {LENGTH_DEBIAS}")
        return v


class LoopConfig(BaseModel):
    """The online loop around the steps (rlhf.reward.online.OnlineRewardLoop)."""

    model_config = ConfigDict(extra="forbid")

    publish_every_steps: int = Field(20, description="publish a new RM version every N training steps")
    checkpoint_every_steps: int = Field(100, description="checkpoint and commit offsets every N steps")
    checkpoint_every_seconds: float = Field(60.0, description="... or after this long with unsaved progress")
    checkpoint_when_idle: bool = Field(True, description="also checkpoint whenever rlhf.feedback runs dry")
    poll_timeout_ms: int = Field(500, description="how long one poll of rlhf.feedback waits")
    max_poll_records: int = Field(256, description="feedback events per poll")
    error_backoff_seconds: float = Field(
        2.0, description="pause after a failed iteration before the last checkpoint is restored"
    )
    tracking: str = Field("tensorboard", description=TRACKING_HELP)  # rlhf/tracking.py

    @field_validator("tracking")
    @classmethod
    def _tracking(cls, v: str) -> str:
        return validate_tracking(v)
