"""The PPO learner: rollouts from Kafka → PPO steps → checkpoints → gated policy versions.

config      PPOConfig (the step's hyper-parameters), LearnerConfig (the process around it)
policy      PolicyWithValueHead: π_θ (LoRA or full) and V on one backbone
batch       rollouts → padded tensors
trainer     PPOTrainer.step: one PPO update on a batch, returns its stats
checkpoint  atomic checkpoints and the trained-rollout ledger
drift       DriftGate: KL(π_new‖π_ref) on held-out prompts
intake      LearnerState (checkpointed bookkeeping), RolloutIntake (batches, drops, offsets)
feedback    users' Feedback events → DPO pairs and NLL answers (user_feedback), or refusals
feedback_intake  FeedbackChannel: the rlhf.feedback consumer and its exactly-once intake
feedback_loss  the users' loss term the trainer adds to its optimizer steps
versions    weight-store records ↔ protos, loading a published version
loop        Learner: the Kafka-driven loop and its control plane
servicer    LearnerServicer: that control plane over gRPC (rlhf.v1.LearnerService); imported
            by the service, not here, so importing rlhf.learner loads no grpc
metrics     Prometheus metrics
"""

from rlhf.learner.config import LearnerConfig, PPOConfig
from rlhf.learner.intake import LearnerState
from rlhf.learner.loop import Learner
from rlhf.learner.policy import PolicyWithValueHead, build_policy
from rlhf.learner.trainer import PPOTrainer

__all__ = [
    "Learner",
    "LearnerConfig",
    "LearnerState",
    "PPOConfig",
    "PPOTrainer",
    "PolicyWithValueHead",
    "build_policy",
]
