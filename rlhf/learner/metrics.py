"""The learner's Prometheus metrics: each PPO step's stats, unchanged.

Gauges hold the last step's value (Grafana plots them over time); counters carry
`_total`; units are in the name where the quantity has one. One learner, so no instance
labels; the only label is why a rollout was invalid (a handful of values).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# stat key from PPOTrainer.step → gauge
STEP_GAUGES: dict[str, Gauge] = {
    key: Gauge(name, doc)
    for key, name, doc in [
        ("kl", "rlhf_learner_kl_nats", "KL(π_θ‖π_ref) per response on the last batch, nats (k1 sum)"),
        ("kl_coef", "rlhf_learner_kl_coef", "β used for the last batch's KL penalty"),
        ("reward_mean", "rlhf_learner_reward_mean", "mean total reward per response: score − β·KL"),
        ("score_mean", "rlhf_learner_score_mean", "mean RM score of the last batch"),
        ("entropy", "rlhf_learner_entropy_nats", "mean per-token policy entropy on the last batch, nats"),
        ("clipfrac", "rlhf_learner_clipped_tokens_ratio", "fraction of tokens where the PPO clip was active"),
        ("approx_kl", "rlhf_learner_approx_kl_nats", "KL(π_old‖π_new) over the update, k3 estimate, nats per token"),
        ("policy_loss", "rlhf_learner_policy_loss", "clipped surrogate loss"),
        ("value_loss", "rlhf_learner_value_loss", "clipped value loss"),
        (
            "value_clipfrac",
            "rlhf_learner_value_clipped_tokens_ratio",
            "fraction of tokens where the value clip was active",
        ),
        ("explained_variance", "rlhf_learner_explained_variance", "1 − Var[R − V]/Var[R] of the critic"),
        ("response_length", "rlhf_learner_response_length_tokens", "mean response length, tokens"),
        ("tokens_per_second", "rlhf_learner_tokens_per_second", "prompt+response tokens per second of PPO step"),
        ("grad_norm", "rlhf_learner_grad_norm", "global gradient norm before clipping, mean over the step"),
        ("lr", "rlhf_learner_learning_rate", "current learning rate"),
        (
            "logprob_mismatch",
            "rlhf_learner_logprob_mismatch_nats",
            "mean |log π_rollout − log π_learner| per token: staleness plus engine numerics",
        ),
        ("staleness_mean", "rlhf_learner_staleness_versions", "mean policy-version lag of the last batch"),
        # group objectives (grpo, rloo, online_dpo)
        ("groups", "rlhf_learner_batch_groups", "rollout groups (prompts) in the last batch"),
        (
            "group_reward_std",
            "rlhf_learner_group_reward_std",
            "grpo: mean over responses of their group's reward std (the advantage's denominator)",
        ),
        (
            "groups_zero_std_ratio",
            "rlhf_learner_groups_zero_std_ratio",
            "grpo: share of responses in groups whose rewards are all equal (advantage 0, nothing learned)",
        ),
        ("rloo_baseline_mean", "rlhf_learner_rloo_baseline_mean", "rloo: mean leave-one-out baseline"),
        ("kl_loss", "rlhf_learner_kl_loss_nats", "kl_in=loss: mean per-token k3(π_θ, π_ref), nats per token"),
        ("dpo_loss", "rlhf_learner_dpo_loss", "online_dpo: mean −log σ(β·margin) over the batch's pairs"),
        (
            "dpo_reward_margin",
            "rlhf_learner_dpo_reward_margin_nats",
            "online_dpo: mean β·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)], nats",
        ),
        ("dpo_accuracy", "rlhf_learner_dpo_accuracy_ratio", "online_dpo: share of pairs with a positive margin"),
        ("dpo_chosen_reward", "rlhf_learner_dpo_chosen_reward_nats", "online_dpo: mean β·(log π_θ − log π_ref)(y_w)"),
        (
            "dpo_rejected_reward",
            "rlhf_learner_dpo_rejected_reward_nats",
            "online_dpo: mean β·(log π_θ − log π_ref)(y_l)",
        ),
        ("dpo_pairs", "rlhf_learner_dpo_pairs", "online_dpo: (best, worst) pairs in the last batch"),
        (
            "dpo_ties_skipped",
            "rlhf_learner_dpo_ties_skipped",
            "online_dpo: groups of the last batch without a pair (all scores equal)",
        ),
        # best-of-n distillation (objective=best_of_n, or distill=best_of_n beside ppo/grpo/rloo)
        (
            "distill_loss",
            "rlhf_learner_distill_loss_nats",
            "best-of-n: mean NLL of the groups' top responses, nats per target token",
        ),
        (
            "distill_targets",
            "rlhf_learner_distill_targets",
            "best-of-n: responses of the last batch distilled (at most one per group)",
        ),
        (
            "distill_groups_skipped",
            "rlhf_learner_distill_groups_skipped",
            "best-of-n: groups of the last batch whose top score did not clear distill_min_score (no target)",
        ),
        (
            "distill_target_score_mean",
            "rlhf_learner_distill_target_score_mean",
            "best-of-n: mean RM score of the distilled responses",
        ),
        # user_feedback: users' own Feedback events beside the rollout objective (rlhf/learner/feedback.py)
        ("user_dpo_loss", "rlhf_learner_user_dpo_loss", "user_feedback: mean −log σ(β·margin) over users' comparisons"),
        (
            "user_dpo_reward_margin",
            "rlhf_learner_user_dpo_reward_margin_nats",
            "user_feedback: mean β·[(log π_θ − log π_ref)(chosen) − (log π_θ − log π_ref)(rejected)] on users' pairs",
        ),
        (
            "user_dpo_accuracy",
            "rlhf_learner_user_dpo_accuracy_ratio",
            "user_feedback: share of users' pairs with a positive margin (the policy agrees with the person)",
        ),
        (
            "user_distill_loss",
            "rlhf_learner_user_distill_loss_nats",
            "user_feedback: mean NLL of thumbs-up and corrected answers, nats per answer token",
        ),
        ("user_feedback_pairs", "rlhf_learner_user_feedback_pairs", "user_feedback: users' pairs in the last step"),
        (
            "user_feedback_answers",
            "rlhf_learner_user_feedback_answers",
            "user_feedback: thumbs-up and corrected answers in the last step",
        ),
        # off_policy_correction=tis (decoupled PPO)
        (
            "tis_truncated_ratio",
            "rlhf_learner_tis_truncated_ratio",
            "share of tokens whose importance weight π_prox/π_behav was truncated at tis_cap",
        ),
        ("tis_weight_mean", "rlhf_learner_tis_weight_mean", "mean truncated importance weight per token"),
    ]
}

STEP_SECONDS = Histogram(
    "rlhf_learner_step_seconds",
    "Wall time of one PPO step",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CHECKPOINT_SECONDS = Histogram(
    "rlhf_learner_checkpoint_seconds",
    "Wall time of writing one checkpoint",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STEPS = Counter("rlhf_learner_steps_total", "PPO steps completed")
FEEDBACK_ALONE_STEPS = Counter(
    "rlhf_learner_feedback_alone_steps_total",
    "user_feedback_alone: steps trained on users' Feedback events with no rollouts (also in rlhf_learner_steps_total)",
)
ROLLOUTS_TRAINED = Counter("rlhf_learner_rollouts_trained_total", "Rollouts trained on")
ROLLOUTS_DROPPED_STALE = Counter(
    "rlhf_learner_rollouts_dropped_stale_total", "Rollouts dropped: generated more than max_policy_lag versions ago"
)
ROLLOUTS_DROPPED_INCOMPLETE = Counter(
    "rlhf_learner_rollouts_dropped_incomplete_group_total",
    "Rollouts dropped with a group objective: another member of their group was invalid or a duplicate",
)
ROLLOUTS_INVALID = Counter(
    "rlhf_learner_rollouts_invalid_total",
    "Rollouts dead-lettered untrained, by reason (empty, lengths, token_id, too_long, non_finite, out_of_range, "
    "version; with a group objective also group, duplicate)",
    ["reason"],
)
STEPS_FAILED = Counter(
    "rlhf_learner_steps_failed_total",
    "PPO steps that raised or went non-finite: weights and optimizer put back, the batch dead-lettered",
)
FEEDBACK_EXAMPLES_TRAINED = Counter(
    "rlhf_learner_feedback_examples_trained_total",
    "user_feedback: examples from users' Feedback events trained, by kind (pair: a comparison with the DPO loss; "
    "answer: a thumbs-up or corrected answer with the NLL)",
    ["kind"],
)
FEEDBACK_SKIPPED = Counter(
    "rlhf_learner_feedback_skipped_total",
    "user_feedback: Feedback events the mode trains nothing of (a thumbs-down without correction; ratings under "
    "dpo; comparisons without correction under distill)",
)
FEEDBACK_INVALID = Counter(
    "rlhf_learner_feedback_invalid_total",
    "user_feedback: Feedback events dead-lettered untrained, by reason (no_rating_or_comparison, empty_prompt, "
    "empty_response, identical_responses, rating_out_of_range, too_long, messages, template, token_id)",
    ["reason"],
)
FEEDBACK_FAILED = Counter(
    "rlhf_learner_feedback_failed_total", "user_feedback: Feedback events dead-lettered with a learner step that failed"
)
ROLLOUTS_FAILED = Counter("rlhf_learner_rollouts_failed_total", "Rollouts dead-lettered with a PPO step that failed")
TOKENS_TRAINED = Counter("rlhf_learner_tokens_total", "Prompt+response tokens trained on")
POLICY_VERSION = Gauge("rlhf_learner_policy_version", "Latest policy version trained")
SERVING_VERSION = Gauge("rlhf_learner_serving_version", "Latest promoted (or rolled-back-to) policy version")
PAUSED = Gauge("rlhf_learner_paused", "1 while training is paused by the control plane")
DRIFT_KL = Gauge("rlhf_learner_drift_kl_nats", "Drift gate: KL(π_new‖π_ref) on held-out prompts, nats per response")
DRIFT_KL_BUDGET = Gauge("rlhf_learner_drift_kl_budget_nats", "Drift gate budget, nats per response")
DRIFT_REJECTIONS = Counter(
    "rlhf_learner_drift_gate_rejections_total", "Policy versions the drift gate refused to promote"
)
VERSIONS_PUBLISHED = Counter("rlhf_learner_versions_published_total", "Policy versions written to the weight store")
KAFKA_ERRORS = Counter(
    "rlhf_learner_kafka_errors_total",
    "Kafka operations of the training loop that failed and were retried (a broker outage)",
    ["operation"],
)
ROLLBACKS = Counter("rlhf_learner_rollbacks_total", "Operator rollbacks to an earlier version")


def observe_step(stats: dict[str, float]) -> None:
    for key, gauge in STEP_GAUGES.items():
        if key in stats:
            gauge.set(stats[key])
    STEP_SECONDS.observe(stats["step_seconds"])
    STEPS.inc()
    TOKENS_TRAINED.inc(stats["tokens"])


# --- canary promotion (issue 15, rlhf/learner/canary.py): label `role` is stable or candidate, never a
# version number (unbounded); the numbers themselves are the two version gauges
CANARY_ENABLED = Gauge(
    "rlhf_learner_canary_enabled", "1 while canaries are on: a version that passes the drift gate goes to canary"
)
CANARY_STABLE_VERSION = Gauge(
    "rlhf_learner_canary_stable_version", "The stable version (what the canary is judged against)"
)
CANARY_CANDIDATE_VERSION = Gauge("rlhf_learner_canary_candidate_version", "The candidate in canary; 0: none running")
CANARY_SHARE = Gauge("rlhf_learner_canary_share_ratio", "Share of new conversations the candidate gets while it runs")
CANARY_QUEUED = Gauge("rlhf_learner_canary_queued", "Candidates waiting for the running canary's decision")
CANARY_THUMBS = Gauge(
    "rlhf_learner_canary_thumbs",
    "Thumbs ratings in the running canary, by role and value (up, down)",
    ["role", "value"],
)
CANARY_THUMBS_UP = Gauge(
    "rlhf_learner_canary_thumbs_up_ratio", "Running canary: thumbs-up rate per role (NaN before a rating)", ["role"]
)
CANARY_THUMBS_UP_LOWER = Gauge(
    "rlhf_learner_canary_thumbs_up_lower_ratio", "Running canary: 95 % Wilson interval's lower end of it", ["role"]
)
CANARY_THUMBS_UP_UPPER = Gauge(
    "rlhf_learner_canary_thumbs_up_upper_ratio", "Running canary: 95 % Wilson interval's upper end of it", ["role"]
)
CANARY_COMPARISONS = Gauge(
    "rlhf_learner_canary_comparisons",
    "Running canary: head-to-head comparisons candidate vs stable, by outcome (won_candidate, won_stable, tie)",
    ["outcome"],
)
CANARY_WIN_RATE = Gauge(
    "rlhf_learner_canary_win_ratio", "Running canary: the candidate's head-to-head win rate, ties left out (NaN: none)"
)
CANARY_WIN_RATE_LOWER = Gauge("rlhf_learner_canary_win_lower_ratio", "95 % Wilson interval's lower end of the win rate")
CANARY_WIN_RATE_UPPER = Gauge("rlhf_learner_canary_win_upper_ratio", "95 % Wilson interval's upper end of the win rate")
CANARY_LOG_E = Gauge(
    "rlhf_learner_canary_log_e_value",
    "Running canary: natural-log e-value that the candidate is better (side=promote) or worse (side=rollback)",
    ["side"],
)
CANARY_LOG_THRESHOLD = Gauge(
    "rlhf_learner_canary_log_e_threshold", "log(1/alpha): a side decides when its log e-value reaches it", ["side"]
)
CANARY_ALERT = Gauge(
    "rlhf_learner_canary_thumbs_down_alert",
    "1 while the running candidate's thumbs are significantly worse than stable's (thumbs e-value ≥ 1/alert_alpha)",
)
CANARY_DECISIONS = Counter(
    "rlhf_learner_canary_decisions_total",
    "Canaries ended, by verdict (promote, roll_back) and by whom (rule: the sequential test or a limit; "
    "operator: Promote/Rollback; replaced: new_candidate=replace)",
    ["verdict", "by"],
)
CANARY_FEEDBACK = Counter(
    "rlhf_learner_canary_feedback_total",
    "Feedback events the canary read, by outcome (observed; else why not: no_canary, before_canary, other_version, "
    "other_pair, same_version, no_kind, bad_value)",
    ["outcome"],
)
