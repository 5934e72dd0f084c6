"""Prometheus counters of the Kafka layer, one place so every service exports the same names."""

from prometheus_client import Counter, Gauge

PRODUCED = Counter(
    "rlhf_kafka_produced_events_total", "Messages the broker acknowledged, by topic", ["topic"]
)
CONSUMED = Counter(
    "rlhf_kafka_consumed_events_total", "Events decoded and handed to the application, by topic", ["topic"]
)
DEAD_LETTERED = Counter(
    "rlhf_kafka_dlq_messages_total", "Undecodable messages moved to the dead-letter twin, by source topic", ["topic"]
)
CONSUMER_LAG = Gauge(
    "rlhf_kafka_consumer_lag_messages",
    "Records not yet consumed (end offset - position), summed over the consumer's partitions",
    ["topic", "group"],
)
