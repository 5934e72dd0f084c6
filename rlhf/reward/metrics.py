"""Prometheus metrics of the reward model: training, versions, feedback intake, scoring."""

from prometheus_client import Counter, Gauge, Histogram

TRAIN_STEPS = Counter("rlhf_rm_train_steps_total", "Reward-model optimiser steps")
LOSS = Gauge("rlhf_rm_loss", "Loss of the last reward-model step (BT and pointwise, mean per example)")
ACCURACY = Gauge(
    "rlhf_rm_accuracy_ratio",
    "Progressive-validation accuracy: share of the last new examples the RM judged right before training on them",
)
PAIRS = Counter("rlhf_rm_pairs_total", "Bradley-Terry pairs trained on for the first time")
POINTWISE = Counter("rlhf_rm_pointwise_total", "Lone thumbs ratings trained on with the pointwise term")
REPLAYED = Counter("rlhf_rm_replayed_examples_total", "Replay-buffer examples mixed into steps")
REPLAY_SIZE = Gauge("rlhf_rm_replay_buffer_examples", "Examples in the replay buffer")
STEP_SECONDS = Histogram(
    "rlhf_rm_train_step_seconds",
    "Wall time of one RM step (validation + forward/backward)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GRAD_NORM = Gauge("rlhf_rm_grad_norm", "Global gradient L2 norm of the last step, before clipping")
FEEDBACK = Counter("rlhf_reward_feedback_events_total", "Feedback events the RM service consumed, by kind", ["kind"])
DUPLICATES = Counter("rlhf_feedback_duplicates_total", "Feedback events dropped as already seen (by event id)")
INVALID = Counter("rlhf_feedback_invalid_total", "Feedback events without training signal, by reason", ["reason"])
VERSION = Gauge("rlhf_rm_version", "Reward-model version being served")
SCORE_MEAN = Gauge("rlhf_rm_score_mean", "Running mean of raw RM scores (normaliser of the served version)")
SCORE_STD = Gauge("rlhf_rm_score_std", "Running std of raw RM scores (normaliser of the served version)")
PUBLISH_SECONDS = Histogram(
    "rlhf_rm_publish_seconds",
    "Writing, swapping in and announcing a new RM version",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CHECKPOINT_SECONDS = Histogram(
    "rlhf_rm_checkpoint_seconds",
    "Writing a trainer checkpoint and committing offsets",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LOOP_ERRORS = Counter(
    "rlhf_rm_loop_errors_total", "Training-loop iterations that failed and restored the last checkpoint"
)
SCORED = Counter("rlhf_reward_scored_items_total", "(prompt, response) items scored by Score")
QUARANTINED_RATERS = Gauge(
    "rlhf_reward_quarantined_raters", "Raters quarantined now: reliability below the threshold, their events held"
)
QUARANTINED_EVENTS = Counter(
    "rlhf_reward_quarantined_events_total", "Feedback events from quarantined raters, copied to the quarantine topic"
)
QUARANTINE_CHANGES = Counter(
    "rlhf_reward_rater_quarantine_changes_total", "Raters quarantined or released, by change", ["change"]
)
RETRACTED = Counter(
    "rlhf_reward_retracted_examples_total", "Training examples taken back because their rater changed the vote"
)
RATER_WEIGHT = Gauge("rlhf_reward_mean_example_weight", "Mean reliability weight of the last step's examples")
