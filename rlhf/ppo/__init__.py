"""PPO with KL control for language models: pure torch, no grpc, no Kafka.

All tensors are `(B, T)` over response tokens; `mask` is 1 on real response tokens and 0
on padding. The pieces, in the order a PPO step uses them:

  logprobs_from_logits, entropy_from_logits   per-token log π and entropy from logits
  kl_penalty, kl_penalized_rewards            r_t = −β·kl_t (+ score at the last token)
  AdaptiveKLController, FixedKLController     β (Ziegler et al. 2019)
  gae                                         advantages and returns (Schulman et al. 2016)
  masked_mean, masked_var, masked_whiten      reductions over the mask
  policy_loss, value_loss                     clipped PPO losses → (loss, stats)
  explained_variance                          critic quality

Beside PPO, for the learner's other objectives:

  grpo_advantages, rloo_advantages            group-relative advantages, no critic (group.py)
  best_worst_pairs, dpo_loss                  online DPO on RM-ranked pairs (dpo.py)
  best_of_n_targets, best_of_n_loss           best-of-n distillation, RAFT / ReST (distill.py)
  tis_weights                                 decoupled-PPO / truncated-IS off-policy weights (offpolicy.py)
"""

from rlhf.ppo.distill import best_of_n_loss, best_of_n_targets
from rlhf.ppo.dpo import best_worst_pairs, dpo_loss, sequence_logprobs
from rlhf.ppo.gae import gae
from rlhf.ppo.group import broadcast_to_tokens, grpo_advantages, rloo_advantages
from rlhf.ppo.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalized_rewards,
    kl_penalty,
)
from rlhf.ppo.loss import policy_loss, value_loss
from rlhf.ppo.masked import (
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)
from rlhf.ppo.offpolicy import tis_weights

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "best_of_n_loss",
    "best_of_n_targets",
    "best_worst_pairs",
    "broadcast_to_tokens",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_penalized_rewards",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "rloo_advantages",
    "sequence_logprobs",
    "tis_weights",
    "value_loss",
]
