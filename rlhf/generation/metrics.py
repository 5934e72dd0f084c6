"""Prometheus metrics of the generation service (units in the names, `_total` on counters)."""

from prometheus_client import Counter, Gauge, Histogram

POLICY_VERSION = Gauge("rlhf_generator_policy_version", "Policy version new requests are served with")
WEIGHT_SYNC_SECONDS = Histogram(
    "rlhf_weight_sync_seconds", "Time from a weight update's arrival to serving it, by format",
    ["format"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
WEIGHT_UPDATES = Counter("rlhf_weight_updates_total", "Weight updates, by format and result (served/refused)", ["format", "result"])
TOKENS = Counter("rlhf_generation_tokens_total", "Tokens processed, by kind (prompt/completion)", ["kind"])
REQUESTS_IN_FLIGHT = Gauge("rlhf_generation_requests_in_flight", "Generate calls holding a policy-version lease")
FIRST_TOKEN_SECONDS = Histogram(
    "rlhf_generation_time_to_first_token_seconds", "Time from request to its first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
