"""EventConsumer: decoded events from one topic, explicit commits, poison messages dead-lettered,
a lost log noticed and read again from its start."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from rlhf.bus.admin import MissingTopicError, bootstrapping
from rlhf.bus.codec import DecodeError, decode
from rlhf.bus.metrics import CONSUMED, CONSUMER_LAG, DEAD_LETTERED, LOG_RESETS
from rlhf.bus.producer import EventProducer
from rlhf.bus.topics import Topics
from rlhf.bus.watch import kafka_watch

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Offsets = dict[tuple[str, int], int]
"""{(topic, partition): offset of the next record to read}, Kafka's commit convention."""


def offsets_to_json(offsets: Offsets) -> list[list[Any]]:
    """[[topic, partition, offset], ...] sorted: how checkpoints store positions (JSON has no tuple keys)."""
    return [[topic, partition, offset] for (topic, partition), offset in sorted(offsets.items())]


def offsets_from_json(rows: Iterable[Sequence[Any]]) -> Offsets:
    """The inverse of `offsets_to_json`."""
    return {(str(topic), int(partition)): int(offset) for topic, partition, offset in rows}


class GroupConfig(BaseModel):
    """How a consumer that may run as several replicas takes its partitions; a service
    carries these as `<service>_kafka_<name>` settings (RLHF_ROLLOUT_KAFKA_MEMBERSHIP=group).

    membership="assign" (the default): static assignment of every partition, one replica per
    group, no group protocol at all. membership="group": Kafka's consumer-group protocol
    (`subscribe`): the replicas of one group id share the topic's partitions, and when one
    leaves or dies (no heartbeat for `session_timeout_ms`) the others take its partitions
    and resume from the group's committed offsets. The timeouts are Apache Kafka's
    defaults; on the embedded broker a join waits the whole `max_poll_interval_ms`, so dev
    and test set them short (docs/deployment.md, "Scaling out")."""

    model_config = ConfigDict(extra="forbid")

    membership: Literal["assign", "group"] = Field(
        "assign", description='"assign": one replica reads every partition; "group": replicas share the partitions'
    )
    session_timeout_ms: int = Field(
        45_000, ge=1, description="membership=group: a replica silent this long is dropped and its partitions move"
    )
    heartbeat_interval_ms: int = Field(
        3_000, ge=1, description="membership=group: heartbeat period (well below session_timeout_ms)"
    )
    max_poll_interval_ms: int = Field(
        300_000, ge=1, description="membership=group: longest gap between polls before a replica is dropped"
    )

    def consumer_kwargs(self) -> dict[str, Any]:
        """EventConsumer arguments: the mode, and in group mode the timeouts."""
        if self.membership == "assign":
            return {"mode": "assign"}
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        return {
            "mode": "subscribe",
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
        }


# Headers a dead-lettered message carries, besides its own original headers.
DLQ_ERROR = "dlq.error"
DLQ_TOPIC = "dlq.topic"
DLQ_PARTITION = "dlq.partition"
DLQ_OFFSET = "dlq.offset"
DLQ_GROUP = "dlq.group"

DeadLetterKind = Literal["undecodable", "invalid", "failed"]
"""Why a message was dead-lettered, the `reason` label of rlhf_kafka_dlq_messages_total:
it does not decode; it decodes but fails the consumer's validation; processing it raised."""


@dataclass(frozen=True)
class Record(Generic[M]):
    """One decoded event and where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    event: M
    headers: dict[str, bytes]
    value: bytes  # the message exactly as it arrived: what dead_letter copies


@dataclass(frozen=True)
class LogReset:
    """The topic's log is not the one the consumer read: it was recreated (new topic id) or
    the cluster was (new cluster id), e.g. the in-memory embedded broker restarted."""

    topic: str
    old: str  # log identity the positions were read from (rlhf.bus.watch)
    new: str  # identity of the log there now
    old_positions: Offsets = field(default_factory=dict)  # where the consumer was in the old log
    new_positions: Offsets = field(default_factory=dict)  # the start of the new log, where it reads next


class EventConsumer(Generic[M]):
    """Reads `message_cls` events from `topic` for consumer group `group_id`.

    Nothing is committed behind the caller's back: `commit()` stores what `poll` has
    returned, or exactly the offsets given (a learner commits what its checkpoint
    holds), and a restarted consumer of the same group resumes there.

    mode="assign" reads every partition of the topic by static assignment, starting
    from the group's committed offsets (else the earliest). One replica per group;
    works on Apache Kafka and on the embedded Tansu broker, where a group *join*
    stalls for max_poll_interval_ms. mode="subscribe" joins the consumer group so
    replicas share the partitions (GroupConfig); a new owner of a partition reads it from
    the group's committed offset. `on_revoked(partitions)` runs (on the polling thread,
    inside `poll`) before partitions go to another replica, the moment to commit what is
    done with them; `on_assigned(partitions)` after new ones arrive.

    A message that does not decode is copied to the topic's `.dlq` twin, with headers
    saying why and where it came from, and skipped; `dead_letter` does the same for an
    event the application refuses. Not thread-safe: one thread polls.

    Lost log: the consumer knows the identity of the log it reads (cluster id + topic id,
    rlhf.bus.watch explains why not offsets) and compares it with the broker's on every
    poll (the process's `KafkaWatch` refreshes it every 2 s) and in `seek(offsets,
    log_ids=...)` against the identity a checkpoint stored with its offsets. On a change
    its positions point into a log that no longer exists (Kafka may answer nothing for
    them, no error), so it logs an ERROR naming the topic and both identities, counts
    rlhf_kafka_log_resets_total{topic}, and reads the new log from its start; `on_reset`
    (called inside `poll`, before any record of the new log is returned) lets the
    application drop state derived from the old offsets. Re-reading is safe where events
    are de-duplicated by event_id; the producers' side (the gateway's outbox) re-sends
    what the old log held.
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
        on_reset: Callable[[LogReset], None] | None = None,
        on_revoked: Callable[[list[tuple[str, int]]], None] | None = None,
        on_assigned: Callable[[list[tuple[str, int]]], None] | None = None,
        **kafka_config,
    ):
        """`dlq_producer`: shared producer for dead letters (one is opened on first need
        otherwise). `on_reset`: called on the polling thread when the log is found lost.
        `kafka_config` passes extra KafkaConsumer settings through unchanged."""
        if mode not in ("assign", "subscribe"):
            raise ValueError(f"mode must be 'assign' or 'subscribe', not {mode!r}")
        self.bootstrap, self.topic, self.group_id = bootstrap, topic, group_id
        self._message_cls = message_cls
        self._dlq_producer = dlq_producer
        self._owns_dlq_producer = False
        self._positions: Offsets = {}  # next offset per partition, past everything handled
        self._lag_exported_at = 0.0
        self._on_reset = on_reset
        self._client_config = dict(
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
        with bootstrapping(bootstrap, bootstrap_timeout_s):
            self._consumer = KafkaConsumer(**self._client_config)
        self._assigned_statically = mode == "assign"
        if mode == "assign":
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                self._consumer.close()
                raise MissingTopicError(
                    f"topic {topic!r} does not exist on {bootstrap}; create it first (rlhf.bus.ensure_topics)"
                )
            self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        else:
            self._consumer.subscribe([topic], listener=_Rebalance(self._positions, on_revoked, on_assigned))
        self._watch = kafka_watch(bootstrap)
        self._watch.watch(topic)
        self._log_id = self._watch.identity(topic, refresh=True)  # None only if the broker went away meanwhile

    def poll(self, timeout_ms: int = 1000, max_records: int = 500) -> list[Record[M]]:
        """Up to `max_records` decoded events, waiting up to `timeout_ms` for the first.

        All or nothing: if dead-lettering fails, nothing is returned, the error is
        raised and the next poll reads the same records again.
        """
        reset = self._check_log()
        if reset is not None and self._on_reset is not None:
            self._on_reset(reset)
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
            value=raw.value,
        )

    def dead_letter(self, record: Record[M], reason: str, kind: DeadLetterKind = "invalid") -> None:
        """Copy `record`, byte for byte, to its topic's `.dlq` twin, `dlq.error` = reason.

        For an event that decodes but cannot be used (it fails the consumer's validation,
        kind="invalid", or processing it raised, kind="failed"); the caller then moves past
        it. Returns once the broker acknowledged the copy; raises PublishError otherwise,
        so a caller that lets the error out has not skipped the event.
        """
        key = record.key.encode() if record.key is not None else None
        self._send_dead_letter(
            record.topic, record.partition, record.offset, key, record.value, record.headers, reason, kind
        )

    def _dead_letter(self, raw: ConsumerRecord, error: DecodeError) -> None:
        self._send_dead_letter(
            raw.topic,
            raw.partition,
            raw.offset,
            raw.key,
            raw.value or b"",
            dict(raw.headers or ()),
            str(error),
            "undecodable",
        )

    def _send_dead_letter(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        headers: dict[str, bytes],
        reason: str,
        kind: DeadLetterKind,
    ) -> None:
        if self._dlq_producer is None:
            self._dlq_producer = EventProducer(self.bootstrap, client_id=f"{self.group_id}-dlq")
            self._owns_dlq_producer = True
        headers = headers | {
            DLQ_ERROR: reason.encode(errors="replace"),
            DLQ_TOPIC: topic.encode(),
            DLQ_PARTITION: str(partition).encode(),
            DLQ_OFFSET: str(offset).encode(),
            DLQ_GROUP: self.group_id.encode(),
        }
        # Wait for the ack: once the position moves on, the message is skipped for good.
        self._dlq_producer.publish_bytes(Topics.dlq(topic), value, key, headers)
        DEAD_LETTERED.labels(topic, kind).inc()

    def commit(self, offsets: Offsets | None = None, timeout_ms: int | None = None) -> None:
        """Commit for the group: by default past everything `poll` has returned, else
        exactly `offsets` ({(topic, partition): next offset to read}). `timeout_ms`: give up
        (KafkaTimeoutError) after this long instead of kafka-python's request_timeout_ms;
        a group member must, since a commit retried while the group rebalances keeps it from
        polling, and so from rejoining."""
        offsets = dict(self._positions) if offsets is None else offsets
        if offsets:
            self._consumer.commit(
                {TopicPartition(t, p): OffsetAndMetadata(off, "", -1) for (t, p), off in offsets.items()},
                timeout_ms=timeout_ms,
            )

    def positions(self) -> Offsets:
        """Next offset per partition past what `poll` has returned (what a checkpoint stores)."""
        return dict(self._positions)

    def seek(self, offsets: Offsets, log_ids: dict[str, str] | None = None) -> LogReset | None:
        """Read next from `offsets`, e.g. the ones a restored checkpoint recorded.

        `log_ids`: the `log_ids()` saved with those offsets. If this topic's differs from
        the log there now, the offsets belong to a lost log: they are not applied, the
        consumer reads the new log from its start, and the `LogReset` is returned (logged
        and counted; `on_reset` is not called: the caller is restoring its state anyway).
        Without `log_ids` (a checkpoint from before they were saved) nothing is checked.
        In mode="subscribe" only partitions currently assigned can be sought.
        """
        saved = (log_ids or {}).get(self.topic)
        current = self._log_id or self._watch.identity(self.topic, refresh=True)
        if saved and current and saved != current:
            self._log_id = current
            return self._reset(saved, current, dict(offsets))
        for (topic, partition), offset in offsets.items():
            self._consumer.seek(TopicPartition(topic, partition), offset)
            self._positions[(topic, partition)] = offset
        return None

    def log_ids(self) -> dict[str, str]:
        """{topic: log identity} of what `positions()` point into: store it beside them."""
        return {self.topic: self._log_id} if self._log_id else {}

    def _check_log(self) -> LogReset | None:
        current = self._watch.identity(self.topic)
        if current is None or current == self._log_id:
            return None  # unknown (broker away, topic not created again yet) or unchanged
        old, self._log_id = self._log_id, current
        if old is None:
            return None  # first sight: nothing to compare with
        return self._reset(old, current, dict(self._positions))

    def _reset(self, old: str, new: str, old_positions: Offsets) -> LogReset:
        parts = sorted(self._consumer.assignment())
        # Forget everything kafka-python holds for the old log (fetch sessions, buffered fetches,
        # leader epochs, its topic id) before reading the new one from its start: a new client.
        # Seeking alone left the old client stuck after the first record of a recreated topic in
        # about 1 run of 5 under load. (mode="subscribe": the group's rebalance owns the
        # assignment; seeking is all we do there.)
        if self._assigned_statically:
            self._consumer.close(autocommit=False)
            self._consumer = KafkaConsumer(**self._client_config)
            self._consumer.assign(parts)
        try:
            start = self._consumer.beginning_offsets(parts)
        except Exception:  # noqa: BLE001 - a fresh log starts at 0; the next poll corrects an error
            start = {tp: 0 for tp in parts}
        for tp in parts:
            self._consumer.seek(tp, start[tp])
        self._positions.clear()
        self._positions.update({(tp.topic, tp.partition): start[tp] for tp in parts})
        reset = LogReset(self.topic, old, new, old_positions, dict(self._positions))
        LOG_RESETS.labels(self.topic).inc()
        log.error(
            "Kafka log of %s lost: log %s replaced by %s (topic or cluster recreated); consumer group %s "
            "reads the new log from its start instead of %s",
            self.topic,
            old,
            new,
            self.group_id,
            {f"{t}/{p}": o for (t, p), o in old_positions.items()},
            extra={"topic": self.topic, "old_log": old, "new_log": new, "group": self.group_id},
        )
        return reset

    def lag(self) -> Offsets:
        """Records not yet read per assigned partition (end offset − position).

        Tansu reports the end offset as the last *batch's* base offset + 1, so on the
        embedded broker this under-counts whenever producers batch; exact on Kafka.
        """
        assigned = list(self._consumer.assignment())
        ends = self._consumer.end_offsets(assigned)
        return {(tp.topic, tp.partition): max(0, ends[tp] - self._consumer.position(tp)) for tp in assigned}

    def partitions(self) -> list[int]:
        """The partitions of the topic this consumer reads now (in group mode: its share)."""
        return sorted(tp.partition for tp in self._consumer.assignment())

    def partition_count(self) -> int:
        """How many partitions the topic has (all replicas of the group together)."""
        return len(self._consumer.partitions_for_topic(self.topic) or ())

    @property
    def assigned(self) -> bool:
        """True once partitions are assigned: what a health check waits for."""
        return bool(self._consumer.assignment())

    def close(self) -> None:
        """Leave without committing; closes the dead-letter producer if this consumer opened it."""
        self._watch.unwatch(self.topic)
        self._consumer.close(autocommit=False)
        if self._owns_dlq_producer:
            self._dlq_producer.close()

    def __enter__(self) -> EventConsumer[M]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Rebalance(ConsumerRebalanceListener):
    """In subscribe mode: before partitions go to another replica, the application's
    `on_revoked` (it commits what it has finished), then their positions are dropped so a
    default `commit()` never commits partitions this consumer no longer owns."""

    def __init__(self, positions: Offsets, on_revoked, on_assigned):
        self._positions = positions
        self._on_revoked, self._on_assigned = on_revoked, on_assigned

    def on_partitions_revoked(self, revoked) -> None:
        parts = sorted((tp.topic, tp.partition) for tp in revoked)
        if self._on_revoked is not None and parts:
            try:
                self._on_revoked(parts)
            except Exception:  # noqa: BLE001 - the new owner re-reads from the last commit: duplicates, no loss
                log.exception("committing revoked partitions failed; their new owner re-reads them")
        for tp in revoked:
            self._positions.pop((tp.topic, tp.partition), None)

    def on_partitions_assigned(self, assigned) -> None:
        if self._on_assigned is not None:
            self._on_assigned(sorted((tp.topic, tp.partition) for tp in assigned))
