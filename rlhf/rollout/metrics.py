"""Prometheus metrics of the rollout worker."""

from prometheus_client import Counter, Gauge, Histogram

ROLLOUTS = Counter("rlhf_rollouts_total", "Rollout events published, by prompt source (live/prompt_set)", ["source"])
RESPONSE_TOKENS = Counter("rlhf_rollout_response_tokens_total", "Response tokens in published rollouts")
GROUPS_DROPPED = Counter("rlhf_rollout_groups_dropped_total", "Prompts whose samples were dropped, by stage", ["stage"])
CALL_ERRORS = Counter(
    "rlhf_rollout_call_errors_total", "Failed gRPC calls, by stage and status code", ["stage", "code"]
)
STAGE_SECONDS = Histogram(
    "rlhf_rollout_stage_seconds",
    "Time per stage of one prompt group (generate/score/reference)",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BACKPRESSURE = Gauge(
    "rlhf_rollout_backpressure", "1 while the worker waits: max_policy_lag versions ahead of the learner"
)
BUDGET_SHARE = Gauge(
    "rlhf_rollout_budget_rollouts",
    "Rollouts this worker may produce per learner announcement: the whole budget, or its partitions' share of it",
)
LIVE_PARTITIONS = Gauge(
    "rlhf_rollout_live_partitions", "Partitions of rlhf.interactions this worker reads (membership=group: its share)"
)
BUDGET_REMAINING = Gauge("rlhf_rollout_budget_remaining", "Rollouts still allowed before a newer policy version")
PROGRESS_VERSION = Gauge(
    "rlhf_rollout_policy_version", "Version of the learner's last PolicyUpdate (it opened the current budget)"
)
POLICY_UPDATES_INVALID = Counter(
    "rlhf_rollout_policy_updates_invalid_total",
    "PolicyUpdate events ignored by the rollout budget, by reason",
    ["reason"],
)
BUDGET_RELEASES = Counter(
    "rlhf_rollout_budget_releases_total",
    "Budgets opened without a PolicyUpdate: the learner dropped rollouts and waits for fresh ones",
)
LIVE_PROMPTS = Counter("rlhf_rollout_live_prompts_total", "Live prompts read from rlhf.interactions")
LIVE_PROMPTS_INVALID = Counter(
    "rlhf_rollout_live_prompts_invalid_total",
    "Live prompts dead-lettered to rlhf.interactions.dlq, by reason (empty, too_long)",
    ["reason"],
)
WAITING_FOR_RM = Gauge(
    "rlhf_rollout_waiting_for_reward_model",
    "1 while no rollout is made: the reward model has not trained on rollout_min_rm_examples yet",
)
