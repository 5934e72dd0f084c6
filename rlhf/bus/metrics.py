"""Prometheus counters of the Kafka layer, one place so every service exports the same names."""

from prometheus_client import Counter, Gauge

PRODUCED = Counter("rlhf_kafka_produced_events_total", "Messages the broker acknowledged, by topic", ["topic"])
CONSUMED = Counter(
    "rlhf_kafka_consumed_events_total", "Events decoded and handed to the application, by topic", ["topic"]
)
DEAD_LETTERED = Counter(
    "rlhf_kafka_dlq_messages_total",
    "Messages moved to the dead-letter twin, by source topic and reason (undecodable, invalid, failed)",
    ["topic", "reason"],
)
CONSUMER_LAG = Gauge(
    "rlhf_kafka_consumer_lag_messages",
    "Records not yet consumed (end offset - position), summed over the consumer's partitions",
    ["topic", "group"],
)
LOG_RESETS = Counter(
    "rlhf_kafka_log_resets_total",
    "Times a topic's log was found lost (recreated: a new cluster/topic id) under a consumer or the outbox, by topic",
    ["topic"],
)
CONNECTED = Gauge(
    "rlhf_kafka_connected",
    "1 while the process's last Metadata request to the broker succeeded (every 2 s), else 0",
    ["service"],
)
