"""The Kafka layer against a real broker: round trips, dead letters, commits, admin."""

import socket
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from rlhf.bus import (
    BrokerUnavailable,
    DecodeError,
    EventConsumer,
    EventProducer,
    MissingTopicError,
    PublishError,
    Topics,
    decode,
    encode,
    ensure_topics,
    new_event,
    wait_for_broker,
)
from rlhf.v1 import common_pb2, events_pb2

CHAT = [common_pb2.ChatMessage(role="user", content="What is the capital of France?")]


def sample_events() -> dict[str, object]:
    """One event of each type, keyed by Topics attribute, every kind of field set."""
    return {
        "feedback": new_event(
            events_pb2.Feedback,
            conversation_id="c1",
            prompt=CHAT,
            comparison=events_pb2.Comparison(
                chosen_id="r1",
                chosen="Paris.",
                rejected_id="r2",
                rejected="Lyon.",
                chosen_policy_version=3,
                rejected_policy_version=2,
            ),
            comment="better",
            source="web",
        ),
        "interactions": new_event(
            events_pb2.Interaction,
            conversation_id="c1",
            prompt=CHAT,
            response_ids=["r1", "r2"],
            responses=["Paris.", "Lyon."],
            policy_version=3,
        ),
        "rollouts": new_event(
            events_pb2.Rollout,
            prompt_id="p1",
            prompt_token_ids=[1, 2, 3],
            response_token_ids=[4, 5],
            logprobs=[-0.5, -1.25],
            ref_logprobs=[-0.75, -1.0],
            score=0.5,
            raw_score=2.0,
            policy_version=3,
            rm_version=7,
            finish_reason="stop",
            source="live",
            prompt=CHAT,
            response="Paris.",
            group_id="g1",
        ),
        "policy_updates": new_event(
            events_pb2.PolicyUpdate,
            version=4,
            parent_version=3,
            step=120,
            uri="/weights/v4",
            sha256="ab" * 32,
            format=common_pb2.WEIGHT_FORMAT_LORA,
            action=events_pb2.POLICY_ACTION_PROMOTED,
            kl_to_reference=0.03,
            kl_budget=0.1,
            base_model="SmolLM2-135M-Instruct",
            reason="passed drift gate",
        ),
        "reward_updates": new_event(
            events_pb2.RewardModelUpdate,
            version=7,
            train_step=50,
            uri="/rm/v7",
            sha256="cd" * 32,
            online_accuracy=0.71,
            score_mean=0.1,
            score_std=1.3,
            pairs_seen=400,
        ),
    }


def scratch_topic(broker, topics) -> str:
    """A topic of this test's prefix that no service uses (and its twin), for the bus alone."""
    topic = topics.prefix + ".scratch"
    ensure_topics(broker.bootstrap, [topic, topics.dlq(topic)])
    return topic


def poll_until(consumer: EventConsumer, n: int, deadline_s: float = 30.0) -> list:
    """Poll until `n` records arrived (a guard against hanging, not a timing check)."""
    records, deadline = [], time.monotonic() + deadline_s
    while len(records) < n and time.monotonic() < deadline:
        records += consumer.poll(timeout_ms=500, max_records=n - len(records))
    return records


def counter(name: str, topic: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"topic": topic, **labels}) or 0.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("attr", list(sample_events()))
def test_every_event_type_round_trips(broker, topics, attr):
    topic = getattr(topics, attr)
    event = sample_events()[attr]
    message_cls = topics.message_class(topic)
    assert isinstance(event, message_cls)

    with EventProducer(broker.bootstrap, client_id="test") as producer:
        meta = producer.publish(topic, event, key="k1", headers={"trace": b"abc"})
    with EventConsumer(broker.bootstrap, topic, message_cls, group_id="test") as consumer:
        (record,) = poll_until(consumer, 1)

    assert record.event == event
    assert (record.topic, record.partition, record.offset) == (topic, meta.partition, meta.offset)
    assert record.key == "k1" and record.headers == {"trace": b"abc"}
    assert counter("rlhf_kafka_produced_events_total", topic) == 1
    assert counter("rlhf_kafka_consumed_events_total", topic) == 1


def test_poison_messages_are_dead_lettered_and_skipped(broker, topics):
    topic = topics.feedback
    good = [new_event(events_pb2.Feedback, conversation_id=f"c{i}") for i in range(2)]
    poison = {
        b"\xff\xfe not protobuf": "not a valid protobuf",
        events_pb2.Feedback(schema_version=1, conversation_id="c").SerializeToString(): "missing event_id",
        events_pb2.Feedback(schema_version=2, event_id="e").SerializeToString(): "newer than supported",
    }
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap)
    values = [encode(good[0]), *poison, encode(good[1])]
    offsets = [raw.send(topic, value=v, key=b"k", headers=[("trace", b"t")]).get(30).offset for v in values]
    raw.close()

    with EventConsumer(broker.bootstrap, topic, events_pb2.Feedback, group_id="reward") as consumer:
        records = poll_until(consumer, 2)
        assert [r.event for r in records] == good
        assert consumer.poll(timeout_ms=500) == []  # skipped for good, not retried
        assert consumer.positions() == {(topic, 0): offsets[-1] + 1}

    dlq = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    dlq.assign([TopicPartition(topics.dlq(topic), 0)])
    dead, deadline = [], time.monotonic() + 30
    while len(dead) < 3 and time.monotonic() < deadline:
        dead += [m for batch in dlq.poll(500).values() for m in batch]
    assert dlq.poll(500) == {}  # each poison message dead-lettered exactly once
    dlq.close()

    assert [m.value for m in dead] == list(poison)
    for message, offset, why in zip(dead, offsets[1:4], poison.values()):
        headers = dict(message.headers)
        assert message.key == b"k"
        assert headers["trace"] == b"t"
        assert headers["dlq.topic"] == topic.encode()
        assert headers["dlq.partition"] == b"0"
        assert headers["dlq.offset"] == str(offset).encode()
        assert headers["dlq.group"] == b"reward"
        assert why in headers["dlq.error"].decode()
    assert counter("rlhf_kafka_dlq_messages_total", topic, reason="undecodable") == 3


def test_a_failed_dead_letter_loses_nothing(broker, topics):
    topic = scratch_topic(broker, topics)
    good = new_event(events_pb2.Prompt, prompt_id="p")
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for value in (b"\xff" * 200, encode(good)):
        raw.send(topic, value=value).get(30)
    raw.close()

    # A DLQ producer that refuses the message: poll raises and keeps its place, every time.
    with EventProducer(broker.bootstrap, max_request_size=128) as refusing:
        with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="g", dlq_producer=refusing) as c:
            for _ in range(2):
                with pytest.raises(PublishError, match="dlq"):
                    poll_until(c, 1)
                assert c.positions() == {}
    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="g") as consumer:
        assert [r.event for r in poll_until(consumer, 1)] == [good]
    assert counter("rlhf_kafka_dlq_messages_total", topic, reason="undecodable") == 1


def test_commit_resumes_a_new_consumer_exactly_after_the_committed_offset(broker, topics):
    topic = scratch_topic(broker, topics)
    events = [new_event(events_pb2.Prompt, prompt_id=f"p{i}") for i in range(6)]
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topic, e, e.prompt_id) for e in events])

    # A learner read four events but its checkpoint holds only the first two.
    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="learner") as first:
        read = poll_until(first, 4)
        assert [r.event for r in read] == events[:4]
        assert first.positions() == {(topic, 0): read[-1].offset + 1}
        first.commit({(topic, 0): read[1].offset + 1})

    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="learner") as second:
        assert [r.event for r in poll_until(second, 4)] == events[2:]
        second.commit()  # default: past everything poll returned

    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="learner") as third:
        assert third.poll(timeout_ms=1000) == []
    # Another group has its own offsets and starts from the earliest.
    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="other") as other:
        assert [r.event for r in poll_until(other, 6)] == events


def test_seek_rereads_from_checkpoint_offsets(broker, topics):
    topic = topics.rollouts
    events = [new_event(events_pb2.Rollout, prompt_id=f"p{i}") for i in range(5)]
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topic, e, e.prompt_id) for e in events])

    with EventConsumer(broker.bootstrap, topic, events_pb2.Rollout, group_id="learner") as consumer:
        read = poll_until(consumer, 5)
        consumer.seek({(topic, 0): read[2].offset})
        assert consumer.positions() == {(topic, 0): read[2].offset}
        assert [r.event for r in poll_until(consumer, 3)] == events[2:]


def test_assign_mode_reads_every_partition(broker, topics):
    topic = topics.prefix + ".partitioned"
    ensure_topics(broker.bootstrap, [topic], partitions=3)
    events = [new_event(events_pb2.Prompt, prompt_id=f"p{i}") for i in range(12)]
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topic, e, e.prompt_id) for e in events])

    with EventConsumer(broker.bootstrap, topic, events_pb2.Prompt, group_id="worker") as consumer:
        records = poll_until(consumer, 12)
        assert sorted(r.event.prompt_id for r in records) == sorted(e.prompt_id for e in events)
        assert {r.partition for r in records} == {0, 1, 2}  # 12 keys over 3 partitions
        consumer.commit()
        assert len(consumer.positions()) == 3


def test_subscribe_mode_joins_the_group_and_commits(broker, topics):
    topic = topics.feedback
    events = [new_event(events_pb2.Feedback, conversation_id=f"c{i}") for i in range(3)]
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topic, e, e.conversation_id) for e in events])

    # Tansu holds a group join for max_poll_interval_ms (300 s by default); a short one
    # keeps this test quick on it. Apache Kafka needs no such setting.
    quick_join = dict(max_poll_interval_ms=3000, session_timeout_ms=3000, heartbeat_interval_ms=1000)
    with EventConsumer(
        broker.bootstrap, topic, events_pb2.Feedback, group_id="rm", mode="subscribe", **quick_join
    ) as consumer:
        assert [r.event for r in poll_until(consumer, 3)] == events
        assert consumer.assigned
        consumer.commit()
    with EventConsumer(broker.bootstrap, topic, events_pb2.Feedback, group_id="rm") as resumed:
        assert resumed.poll(timeout_ms=1000) == []


def test_lag_counts_unread_events(broker, topics):
    topic = topics.interactions
    with EventProducer(broker.bootstrap) as producer:
        for i in range(3):  # one publish per event: Tansu's end offset is exact only per batch
            producer.publish(topic, new_event(events_pb2.Interaction, conversation_id=f"c{i}"), f"c{i}")
    with EventConsumer(broker.bootstrap, topic, events_pb2.Interaction, group_id="g") as consumer:
        assert consumer.lag() == {(topic, 0): 3}
        consumer.LAG_EXPORT_INTERVAL_S = 0.0
        poll_until(consumer, 3)
        assert consumer.lag() == {(topic, 0): 0}
        exported = REGISTRY.get_sample_value("rlhf_kafka_consumer_lag_messages", {"topic": topic, "group": "g"})
        assert exported == 0.0


def test_ensure_topics_twice_is_fine(broker):
    fresh = Topics(prefix=f"ensure-{time.monotonic_ns()}")
    assert sorted(ensure_topics(broker.bootstrap, fresh.all())) == sorted(fresh.all())
    assert ensure_topics(broker.bootstrap, fresh.all()) == []


def test_publish_raises_when_the_event_cannot_be_written(broker, topics):
    topic = scratch_topic(broker, topics)
    big = new_event(events_pb2.Prompt, prompt_id="p", source="x" * 4000)
    with EventProducer(broker.bootstrap, max_request_size=1024) as producer:
        with pytest.raises(PublishError, match="MessageSizeTooLarge"):
            producer.publish(topic, big, "p")
        with pytest.raises(PublishError, match="1 of 2 events"):
            producer.publish_many([(topic, big, "p"), (topic, new_event(events_pb2.Prompt), "q")])


def test_unreachable_broker_and_missing_topic_say_what_to_fix(broker):
    nowhere = f"127.0.0.1:{closed_port()}"
    with pytest.raises(BrokerUnavailable, match="rlhf broker"):
        wait_for_broker(nowhere, timeout_s=1)
    with pytest.raises(BrokerUnavailable):
        ensure_topics(nowhere, ["t"], timeout_s=1)
    with pytest.raises(BrokerUnavailable):
        EventProducer(nowhere, bootstrap_timeout_s=1)
    with pytest.raises(MissingTopicError, match="ensure_topics"):
        EventConsumer(broker.bootstrap, "no-such-topic", events_pb2.Prompt, group_id="g")


def test_decode_refuses_what_a_consumer_cannot_trust():
    event = new_event(events_pb2.Prompt, prompt_id="p")
    assert len(event.event_id) == 32 and event.schema_version == 1 and event.created_unix_ms > 0
    assert decode(events_pb2.Prompt, encode(event)) == event
    with pytest.raises(DecodeError, match="not a valid protobuf"):
        decode(events_pb2.Prompt, b"\xff\xfe")
    with pytest.raises(DecodeError, match="missing event_id"):
        decode(events_pb2.Prompt, events_pb2.Prompt(schema_version=1).SerializeToString())
    with pytest.raises(DecodeError, match="newer than supported"):
        decode(events_pb2.Prompt, events_pb2.Prompt(schema_version=2, event_id="e").SerializeToString())
    with pytest.raises(DecodeError, match="tombstone"):
        decode(events_pb2.Prompt, None)
    with pytest.raises(ValueError, match="new_event"):
        encode(events_pb2.Prompt(prompt_id="p"))
