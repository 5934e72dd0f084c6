"""EventConsumer: decoded events from one topic, explicit commits, poison messages dead-lettered."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition

from rlhf.bus.admin import MissingTopicError, bootstrapping
from rlhf.bus.codec import DecodeError, decode
from rlhf.bus.metrics import CONSUMED, CONSUMER_LAG, DEAD_LETTERED
from rlhf.bus.producer import EventProducer
from rlhf.bus.topics import Topics

M = TypeVar("M", bound=Message)
Offsets = dict[tuple[str, int], int]
"""{(topic, partition): offset of the next record to read}, Kafka's commit convention."""

# Headers a dead-lettered message carries, besides its own original headers.
DLQ_ERROR = "dlq.error"
DLQ_TOPIC = "dlq.topic"
DLQ_PARTITION = "dlq.partition"
DLQ_OFFSET = "dlq.offset"
DLQ_GROUP = "dlq.group"


@dataclass(frozen=True)
class Record(Generic[M]):
    """One decoded event and where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    event: M
    headers: dict[str, bytes]


class EventConsumer(Generic[M]):
    """Reads `message_cls` events from `topic` for consumer group `group_id`.

    Nothing is committed behind the caller's back: `commit()` stores what `poll` has
    returned, or exactly the offsets given (a learner commits what its checkpoint
    holds), and a restarted consumer of the same group resumes there.

    mode="assign" reads every partition of the topic by static assignment, starting
    from the group's committed offsets (else the earliest). One replica per group;
    works on Apache Kafka and on the embedded Tansu broker, where a group *join*
    stalls for max_poll_interval_ms. mode="subscribe" joins the consumer group so
    replicas share the partitions (Apache Kafka).

    A message that does not decode is copied to the topic's `.dlq` twin, with headers
    saying why and where it came from, and skipped. Not thread-safe: one thread polls.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        message_cls: type[M],
        group_id: str,
        dlq_producer: EventProducer | None = None,
        mode: Literal["assign", "subscribe"] = "assign",
        *,
        client_id: str | None = None,
        bootstrap_timeout_s: float = 30.0,
        **kafka_config,
    ):
        """`dlq_producer`: shared producer for dead letters (one is opened on first need
        otherwise). `kafka_config` passes extra KafkaConsumer settings through unchanged."""
        if mode not in ("assign", "subscribe"):
            raise ValueError(f"mode must be 'assign' or 'subscribe', not {mode!r}")
        self.bootstrap, self.topic, self.group_id = bootstrap, topic, group_id
        self._message_cls = message_cls
        self._dlq_producer = dlq_producer
        self._owns_dlq_producer = False
        self._positions: Offsets = {}  # next offset per partition, past everything handled
        self._lag_exported_at = 0.0
        with bootstrapping(bootstrap, bootstrap_timeout_s):
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=group_id,
                client_id=client_id or group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # Topics are created explicitly, with their partition counts; a typo
                # must fail here, not create a topic nobody writes to.
                allow_auto_create_topics=False,
                bootstrap_timeout_ms=int(bootstrap_timeout_s * 1000),
                **kafka_config,
            )
        if mode == "assign":
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                self._consumer.close()
                raise MissingTopicError(
                    f"topic {topic!r} does not exist on {bootstrap}; create it first (rlhf.bus.ensure_topics)"
                )
            self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        else:
            self._consumer.subscribe([topic], listener=_ForgetRevoked(self._positions))

    def poll(self, timeout_ms: int = 1000, max_records: int = 500) -> list[Record[M]]:
        """Up to `max_records` decoded events, waiting up to `timeout_ms` for the first.

        All or nothing: if dead-lettering fails, nothing is returned, the error is
        raised and the next poll reads the same records again.
        """
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        before = dict(self._positions)
        records = []
        try:
            for tp, raw_records in batches.items():
                for raw in raw_records:
                    record = self._decode_or_dead_letter(raw)
                    if record is not None:
                        records.append(record)
                    self._positions[(tp.topic, tp.partition)] = raw.offset + 1
        except BaseException:
            # kafka-python has already moved past this batch; rewind it.
            for tp, raw_records in batches.items():
                self._consumer.seek(tp, raw_records[0].offset)
            self._positions.clear()
            self._positions.update(before)
            raise
        CONSUMED.labels(self.topic).inc(len(records))
        self._export_lag()
        return records

    #: seconds between lag exports; each costs an offsets round-trip to the broker
    LAG_EXPORT_INTERVAL_S = 10.0

    def _export_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_exported_at < self.LAG_EXPORT_INTERVAL_S or not self.assigned:
            return
        self._lag_exported_at = now
        try:
            CONSUMER_LAG.labels(self.topic, self.group_id).set(sum(self.lag().values()))
        except Exception:  # noqa: BLE001 - a metric must never break consumption
            pass

    def _decode_or_dead_letter(self, raw: ConsumerRecord) -> Record[M] | None:
        try:
            event = decode(self._message_cls, raw.value)
        except DecodeError as e:
            self._dead_letter(raw, e)
            return None
        return Record(
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            key=raw.key.decode(errors="replace") if raw.key is not None else None,
            event=event,
            headers=dict(raw.headers or ()),
        )

    def _dead_letter(self, raw: ConsumerRecord, error: DecodeError) -> None:
        if self._dlq_producer is None:
            self._dlq_producer = EventProducer(self.bootstrap, client_id=f"{self.group_id}-dlq")
            self._owns_dlq_producer = True
        headers = dict(raw.headers or ()) | {
            DLQ_ERROR: str(error).encode(),
            DLQ_TOPIC: raw.topic.encode(),
            DLQ_PARTITION: str(raw.partition).encode(),
            DLQ_OFFSET: str(raw.offset).encode(),
            DLQ_GROUP: self.group_id.encode(),
        }
        # Wait for the ack: once the position moves on, the message is skipped for good.
        self._dlq_producer.publish_bytes(Topics.dlq(raw.topic), raw.value or b"", raw.key, headers)
        DEAD_LETTERED.labels(raw.topic).inc()

    def commit(self, offsets: Offsets | None = None) -> None:
        """Commit for the group: by default past everything `poll` has returned, else
        exactly `offsets` ({(topic, partition): next offset to read})."""
        offsets = dict(self._positions) if offsets is None else offsets
        if offsets:
            self._consumer.commit(
                {TopicPartition(t, p): OffsetAndMetadata(off, "", -1) for (t, p), off in offsets.items()}
            )

    def positions(self) -> Offsets:
        """Next offset per partition past what `poll` has returned (what a checkpoint stores)."""
        return dict(self._positions)

    def seek(self, offsets: Offsets) -> None:
        """Read next from `offsets`, e.g. the ones a restored checkpoint recorded.

        In mode="subscribe" only partitions currently assigned can be sought.
        """
        for (topic, partition), offset in offsets.items():
            self._consumer.seek(TopicPartition(topic, partition), offset)
            self._positions[(topic, partition)] = offset

    def lag(self) -> Offsets:
        """Records not yet read per assigned partition (end offset − position).

        Tansu reports the end offset as the last *batch's* base offset + 1, so on the
        embedded broker this under-counts whenever producers batch; exact on Kafka.
        """
        assigned = list(self._consumer.assignment())
        ends = self._consumer.end_offsets(assigned)
        return {(tp.topic, tp.partition): max(0, ends[tp] - self._consumer.position(tp)) for tp in assigned}

    @property
    def assigned(self) -> bool:
        """True once partitions are assigned: what a health check waits for."""
        return bool(self._consumer.assignment())

    def close(self) -> None:
        """Leave without committing; closes the dead-letter producer if this consumer opened it."""
        self._consumer.close(autocommit=False)
        if self._owns_dlq_producer:
            self._dlq_producer.close()

    def __enter__(self) -> EventConsumer[M]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ForgetRevoked(ConsumerRebalanceListener):
    """In subscribe mode, drops positions of partitions handed to another replica, so a
    default `commit()` never commits partitions this consumer no longer owns."""

    def __init__(self, positions: Offsets):
        self._positions = positions

    def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self._positions.pop((tp.topic, tp.partition), None)

    def on_partitions_assigned(self, assigned) -> None:
        pass
