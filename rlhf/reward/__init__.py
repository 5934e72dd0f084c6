"""The reward model r_φ and its online training from live feedback.

  config      TrainerConfig, LoopConfig: the training settings (reward_* settings of the service)
  model       RewardModel: backbone (MiniLM encoder or the policy's decoder) + scalar head
  loss        bradley_terry_loss, pointwise_logistic_loss → (loss, stats)
  data        Example, feedback → examples (thumbs pairing), EventDedup, ReplayBuffer
  normalizer  ScoreNormalizer: running mean/std, clipped; travels with each version
  trainer     OnlineRewardTrainer: progressive validation, replay mixing, one step per batch
  checkpoint  RewardCheckpoints: versions in a WeightStore + trainer states
  online      OnlineRewardLoop: Kafka feedback → steps → versions → checkpoints → offsets
  servicer    RewardServicer: Score (micro-batched, one version a batch) and GetInfo over gRPC
Everything but `online` and `servicer` is importable without grpc or Kafka; the service
imports the servicer, this package does not.
"""

from rlhf.reward.config import LoopConfig, TrainerConfig
from rlhf.reward.data import PAIR, POINT, EventDedup, Example, FeedbackConverter, ReplayBuffer, messages_of
from rlhf.reward.loss import bradley_terry_loss, pointwise_logistic_loss
from rlhf.reward.model import BackboneSpec, RewardModel, load_reward_model, resolve_backbone
from rlhf.reward.normalizer import ScoreNormalizer
from rlhf.reward.trainer import OnlineRewardTrainer

__all__ = [
    "PAIR",
    "POINT",
    "BackboneSpec",
    "EventDedup",
    "Example",
    "FeedbackConverter",
    "LoopConfig",
    "OnlineRewardTrainer",
    "ReplayBuffer",
    "RewardModel",
    "ScoreNormalizer",
    "TrainerConfig",
    "bradley_terry_loss",
    "load_reward_model",
    "messages_of",
    "pointwise_logistic_loss",
    "resolve_backbone",
]
