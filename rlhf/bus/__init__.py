"""The Kafka layer: topic names, the event codec, producer, consumer and admin helpers.

    topics = Topics("rlhf")
    ensure_topics(bootstrap, topics.all())
    with EventProducer(bootstrap, client_id="gateway") as producer:
        producer.publish(topics.feedback, new_event(Feedback, conversation_id=cid, ...), key=cid)
    with EventConsumer(bootstrap, topics.feedback, Feedback, group_id="reward") as consumer:
        for record in consumer.poll():
            ...
        consumer.commit()

A lost log (topic or cluster recreated, e.g. the in-memory embedded broker restarted) is
noticed by every consumer and by `kafka_watch`: see rlhf.bus.watch.
"""

from rlhf.bus.admin import BrokerUnavailable, MissingTopicError, ensure_topics, wait_for_broker
from rlhf.bus.codec import SCHEMA_VERSION, DecodeError, decode, encode, new_event
from rlhf.bus.consumer import EventConsumer, LogReset, Offsets, Record, offsets_from_json, offsets_to_json
from rlhf.bus.producer import EventProducer, PublishError
from rlhf.bus.topics import Topics
from rlhf.bus.watch import KafkaWatch, kafka_watch

__all__ = [
    "SCHEMA_VERSION",
    "BrokerUnavailable",
    "DecodeError",
    "EventConsumer",
    "EventProducer",
    "KafkaWatch",
    "LogReset",
    "MissingTopicError",
    "Offsets",
    "PublishError",
    "Record",
    "Topics",
    "decode",
    "encode",
    "ensure_topics",
    "kafka_watch",
    "new_event",
    "offsets_from_json",
    "offsets_to_json",
    "wait_for_broker",
]
