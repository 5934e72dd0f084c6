"""Settings of the learner service: every LearnerConfig field with a learner_ prefix
(RLHF_LEARNER_<NAME> or --learner-<name>) and every field of the canary's config with a
canary_ prefix (RLHF_CANARY_<NAME>: canary_enabled, canary_share, canary_promote_alpha, …;
rlhf/learner/canary.py); `rlhf config` lists them."""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator

from rlhf.learner.canary import LearnerCanaryConfig
from rlhf.learner.config import LearnerConfig
from rlhf.serving import GrpcServiceSettings
from rlhf.serving.settings import PolicyModelSettings, WeightStoreSettings, config_from, settings_model

PREFIX = "learner_"
CANARY_PREFIX = "canary_"


class _LearnerSettingsBase(PolicyModelSettings, WeightStoreSettings, GrpcServiceSettings):
    renamed = {"learner_weight_store_dir": "weight_store"}

    port: int = Field(50054, description="gRPC port")
    metrics_port: int = Field(9104, description="Prometheus /metrics HTTP port; 0 disables it")

    def learner_config(self) -> LearnerConfig:
        return config_from(self, LearnerConfig, PREFIX)

    def canary_config(self) -> LearnerCanaryConfig:
        return config_from(self, LearnerCanaryConfig, CANARY_PREFIX)

    @model_validator(mode="after")
    def _learner_rules(self):
        # LearnerConfig's cross-setting rules (objective, kl_in, off-policy correction) at load
        # time, so a bad combination is refused before the model loads
        try:
            self.learner_config()
        except ValidationError as e:
            raise ValueError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
        return self


LearnerSettings = settings_model(
    "LearnerSettings",
    _LearnerSettingsBase,
    "Settings of the learner service: the gRPC/Kafka basics plus every LearnerConfig and canary field.",
    {PREFIX: (LearnerConfig,), CANARY_PREFIX: (LearnerCanaryConfig,)},
)
