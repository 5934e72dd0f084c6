"""The learner's Prometheus metrics: each PPO step's stats, unchanged (STYLE.md #5).

Gauges hold the last step's value (Grafana plots them over time); counters carry
`_total`; units are in the name where the quantity has one. No labels: one learner.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# stat key from PPOTrainer.step → gauge
STEP_GAUGES: dict[str, Gauge] = {
    key: Gauge(name, doc)
    for key, name, doc in [
        ("kl", "rlhf_learner_kl", "KL(π_θ‖π_ref) per response on the last batch, nats (k1 sum)"),
        ("kl_coef", "rlhf_learner_kl_coef", "β used for the last batch's KL penalty"),
        ("reward_mean", "rlhf_learner_reward_mean", "mean total reward per response: score − β·KL"),
        ("score_mean", "rlhf_learner_score_mean", "mean RM score of the last batch"),
        ("entropy", "rlhf_learner_entropy_nats", "mean per-token policy entropy on the last batch, nats"),
        ("clipfrac", "rlhf_learner_clipfrac", "fraction of tokens where the PPO clip was active"),
        ("approx_kl", "rlhf_learner_approx_kl", "KL(π_old‖π_new) over the update, k3 estimate, nats per token"),
        ("policy_loss", "rlhf_learner_policy_loss", "clipped surrogate loss"),
        ("value_loss", "rlhf_learner_value_loss", "clipped value loss"),
        ("value_clipfrac", "rlhf_learner_value_clipfrac", "fraction of tokens where the value clip was active"),
        ("explained_variance", "rlhf_learner_explained_variance", "1 − Var[R − V]/Var[R] of the critic"),
        ("response_length", "rlhf_learner_response_length_tokens", "mean response length, tokens"),
        ("tokens_per_second", "rlhf_learner_tokens_per_second", "prompt+response tokens per second of PPO step"),
        ("grad_norm", "rlhf_learner_grad_norm", "global gradient norm before clipping, mean over the step"),
        ("lr", "rlhf_learner_learning_rate", "current learning rate"),
        ("logprob_mismatch", "rlhf_learner_logprob_mismatch_nats",
         "mean |log π_rollout − log π_learner| per token: staleness plus engine numerics"),
        ("staleness_mean", "rlhf_learner_staleness_versions", "mean policy-version lag of the last batch"),
    ]
}

STEP_SECONDS = Histogram(
    "rlhf_learner_step_seconds", "Wall time of one PPO step",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CHECKPOINT_SECONDS = Histogram(
    "rlhf_learner_checkpoint_seconds", "Wall time of writing one checkpoint",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STEPS = Counter("rlhf_learner_steps_total", "PPO steps completed")
ROLLOUTS_TRAINED = Counter("rlhf_learner_rollouts_trained_total", "Rollouts trained on")
ROLLOUTS_DROPPED_STALE = Counter(
    "rlhf_learner_rollouts_dropped_stale_total", "Rollouts dropped: generated more than max_policy_lag versions ago"
)
ROLLOUTS_INVALID = Counter(
    "rlhf_learner_rollouts_invalid_total", "Rollouts dropped: malformed (empty, or log-probs not aligned with tokens)"
)
TOKENS_TRAINED = Counter("rlhf_learner_tokens_total", "Prompt+response tokens trained on")
POLICY_VERSION = Gauge("rlhf_learner_policy_version", "Latest policy version trained")
SERVING_VERSION = Gauge("rlhf_learner_serving_version", "Latest promoted (or rolled-back-to) policy version")
PAUSED = Gauge("rlhf_learner_paused", "1 while training is paused by the control plane")
DRIFT_KL = Gauge("rlhf_learner_drift_kl", "Drift gate: KL(π_new‖π_ref) on held-out prompts, nats per response")
DRIFT_KL_BUDGET = Gauge("rlhf_learner_drift_kl_budget", "Drift gate budget, nats per response")
DRIFT_REJECTIONS = Counter(
    "rlhf_learner_drift_gate_rejections_total", "Policy versions the drift gate refused to promote"
)
VERSIONS_PUBLISHED = Counter("rlhf_learner_versions_published_total", "Policy versions written to the weight store")
ROLLBACKS = Counter("rlhf_learner_rollbacks_total", "Operator rollbacks to an earlier version")


def observe_step(stats: dict[str, float]) -> None:
    for key, gauge in STEP_GAUGES.items():
        if key in stats:
            gauge.set(stats[key])
    STEP_SECONDS.observe(stats["step_seconds"])
    STEPS.inc()
    TOKENS_TRAINED.inc(stats["tokens"])
