"""Settings of the rollout worker: its own fields and every WorkerConfig field with a
rollout_ prefix (RLHF_ROLLOUT_<NAME> or --rollout-<name>; `rlhf config` lists them)."""

from __future__ import annotations

from pydantic import Field

from rlhf.bus.consumer import GroupConfig
from rlhf.rollout.worker import WorkerConfig
from rlhf.serving import GrpcServiceSettings
from rlhf.serving.settings import GeneratorAddress, RewardAddress, settings_model


class _RolloutSettingsBase(RewardAddress, GeneratorAddress, GrpcServiceSettings):
    renamed = {
        "samples_per_prompt": "rollout_samples_per_prompt",
        "min_rm_examples": "rollout_min_rm_examples",
        "generate_timeout_s": "rollout_generate_timeout_seconds",
        "score_timeout_s": "rollout_score_timeout_seconds",
        "reference_timeout_s": "rollout_reference_timeout_seconds",
        "max_backoff_s": "rollout_max_backoff_seconds",
        "version_poll_s": "rollout_version_poll_seconds",
    }

    port: int = Field(50055, description="gRPC port (health only)")
    metrics_port: int = Field(9105, description="Prometheus /metrics HTTP port; 0 disables it")
    reference_addr: str = Field("127.0.0.1:50053", description="ReferenceService address")
    learner_addr: str = Field(
        "127.0.0.1:50054",
        description="LearnerService address, read-only (GetStatus): rollouts "
        "it dropped as stale reopen the budget; empty: PolicyUpdate "
        "events alone move it",
    )
    prompt_set: str = Field(
        "train", description='"train" (bundled rlhf/data/prompts_train.jsonl) or a .jsonl/.txt file'
    )
    live_fraction: float = Field(0.5, description="share of prompts taken from live traffic when live prompts wait")
    live_buffer: int = Field(256, description="live prompts kept waiting; the oldest are dropped beyond this")
    rollout_group_id: str = Field("rollout", description="Kafka consumer group of the live-prompt consumer")
    rollout_seed: int = Field(0, description="seed of the prompt order and the live/prompt-set mix")


PREFIX = "rollout_"
GROUP_PREFIX = "rollout_kafka_"
"""RLHF_ROLLOUT_KAFKA_MEMBERSHIP=group (and its timeouts): workers share rlhf.interactions and the budget."""
RolloutSettings = settings_model(
    "RolloutSettings",
    _RolloutSettingsBase,
    "Settings of the rollout worker: the gRPC/Kafka basics, the peers, the prompt mix, and every WorkerConfig "
    "field with a rollout_ prefix, and the consumer-group settings (GroupConfig) with a rollout_kafka_ prefix. "
    "Rollouts per version, max policy lag and the sampling temperature are the "
    "learner's: it announces them in its PolicyUpdates.",
    {PREFIX: (WorkerConfig,), GROUP_PREFIX: (GroupConfig,)},
)

# Settings the learner now announces: set, they would be ignored, so say so.
ANNOUNCED_BY_THE_LEARNER = {
    "RLHF_ROLLOUTS_PER_VERSION": "RLHF_LEARNER_BATCH_SIZE × RLHF_LEARNER_PUBLISH_EVERY",
    "RLHF_MAX_POLICY_LAG": "RLHF_LEARNER_MAX_POLICY_LAG",
    "RLHF_ROLLOUT_TEMPERATURE": "RLHF_LEARNER_TEMPERATURE",
}
