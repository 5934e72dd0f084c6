"""The rollout worker: samples from the current policy, scores, reference log-probs, and
publishes Rollout events, never more than max_policy_lag versions ahead (docs/generation.md)."""

from rlhf.prompts import EVAL, TRAIN, load_prompts
from rlhf.rollout.budget import PolicyBudget
from rlhf.rollout.prompt_set import build_prompt_sets
from rlhf.rollout.sources import PromptItem, PromptMixer
from rlhf.rollout.worker import RolloutLoop, WorkerConfig, call_with_retry

__all__ = [
    "EVAL",
    "TRAIN",
    "PolicyBudget",
    "PromptItem",
    "PromptMixer",
    "RolloutLoop",
    "WorkerConfig",
    "build_prompt_sets",
    "call_with_retry",
    "load_prompts",
]
