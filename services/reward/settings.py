"""Settings of the reward service: its own fields and every TrainerConfig / LoopConfig field
with a reward_ prefix (RLHF_REWARD_<NAME> or --reward-<name>; `rlhf config` lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from rlhf.reward.config import LoopConfig, TrainerConfig
from rlhf.reward.reliability import ReliabilityConfig
from rlhf.serving import GrpcServiceSettings
from rlhf.serving.settings import PolicyModelSettings, settings_model


class _RewardSettingsBase(PolicyModelSettings, GrpcServiceSettings):
    port: int = Field(50052, description="gRPC port")
    metrics_port: int = Field(9102, description="Prometheus /metrics HTTP port; 0 disables it")
    reward_backbone: str = Field(
        "minilm",
        description='"minilm" (all-MiniLM-L6-v2), "tiny" (random tiny BERT, tests), "policy" (RLHF_MODEL) or a folder',
    )
    reward_max_items: int = Field(256, description="most (prompt, response) items in one Score call")
    reward_max_tokens: int = Field(256, description="tokens the RM reads per item; longer text is truncated")
    reward_score_batch_size: int = Field(64, description="items per RM forward pass when scoring")
    reward_max_wait_ms: float = Field(2.0, description="how long a lone Score call waits for others to batch with")
    reward_keep_versions: int = Field(5, description="RM versions kept on disk (plus those checkpoints name)")
    reward_group_id: str = Field("reward", description="Kafka consumer group of the feedback consumer")
    reward_device: str = Field("auto", description='"auto" (cuda if present), "cpu" or "cuda[:n]"')
    reward_torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default (all cores)")
    reward_role: Literal["trainer", "scorer"] = Field(
        "trainer",
        description='"trainer": trains the RM from rlhf.feedback, writes its versions and serves Score (one per '
        'state dir, fenced); "scorer": serves Score only, with the newest version in reward_store, loaded at start '
        "and on each rlhf.reward-updates announcement (any number of replicas; docs/deployment.md)",
    )
    reward_store: Path | None = Field(
        None,
        description="folder of RM versions: the trainer writes them, scorers load them (a volume both mount); "
        "default <state_dir>/reward/versions",
    )
    reward_follow_seconds: float = Field(
        30.0,
        gt=0,
        description="role scorer: also look for a newer version in reward_store this often (an announcement "
        "that did not go out is caught this way)",
    )

    def reward_store_path(self) -> Path:
        return self.reward_store or self.state_dir / "reward" / "versions"  # type: ignore[attr-defined]


PREFIX = "reward_"
RELIABILITY_PREFIX = "reward_reliability_"
RewardSettings = settings_model(
    "RewardSettings",
    _RewardSettingsBase,
    "Settings of the reward service: the gRPC/Kafka basics, its own fields, every TrainerConfig and "
    "LoopConfig field with a reward_ prefix, and every ReliabilityConfig field with a reward_reliability_ prefix.",
    {PREFIX: (TrainerConfig, LoopConfig), RELIABILITY_PREFIX: (ReliabilityConfig,)},
)
