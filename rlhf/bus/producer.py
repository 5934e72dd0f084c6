"""EventProducer: protobuf events to Kafka, acknowledged by all in-sync replicas."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from google.protobuf.message import Message
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata, RecordMetadata

from rlhf.bus.admin import bootstrapping
from rlhf.bus.codec import encode
from rlhf.bus.metrics import PRODUCED

log = logging.getLogger(__name__)

Key = str | bytes | None
Headers = Mapping[str, bytes]


class PublishError(RuntimeError):
    """The broker did not acknowledge an event in time, or refused it."""


class EventProducer:
    """Publishes events with acks="all" and idempotence, so a retry never duplicates a write.

    `send` is fire-and-check-later; `publish` and `publish_many` return only once the
    broker has acknowledged every event, and raise otherwise. (kafka-python's `flush()`
    never reports a failed send: only each future's `.get()` does.) Thread-safe.

    A broker that restarted without its state (the in-memory embedded broker, a rebuilt
    cluster) does not know the idempotent producer's id: kafka-python then fails every
    later send for good ("UnknownProducerIdError", a fatal InitProducerId error). So a
    failed acknowledgement replaces the underlying KafkaProducer, and `publish` /
    `publish_bytes` try once more on the new one (a write that merely timed out may then
    be in the log twice: consumers drop duplicates by event_id). `publish_many` does not
    retry: its caller retries the batch.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str = "rlhf",
        *,
        linger_ms: int = 5,
        bootstrap_timeout_s: float = 30.0,
        **kafka_config,
    ):
        """`kafka_config` passes extra KafkaProducer settings (e.g. TLS) through unchanged."""
        self.bootstrap = bootstrap
        self._config = dict(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            # retries: kafka-python's default, unbounded in count and bounded in time
            # by delivery_timeout_ms (120 s), as its docs advise; idempotence makes
            # them duplicate-free. publish() stops waiting after its own timeout.
            # A few ms of batching costs little latency and cuts requests a lot.
            linger_ms=linger_ms,
            bootstrap_timeout_ms=int(bootstrap_timeout_s * 1000),
            **kafka_config,
        )
        self._lock = threading.Lock()
        with bootstrapping(bootstrap, bootstrap_timeout_s):
            self._producer = KafkaProducer(**self._config)
        # set from kafka-python's I/O thread when a send fails; replaced on the next send,
        # on the caller's thread (a producer cannot be closed from its own I/O thread)
        self._failed: KafkaProducer | None = None

    def _current(self) -> KafkaProducer:
        """The KafkaProducer to send with: a new one if the current one had a send fail."""
        with self._lock:
            failed = self._producer if self._failed is self._producer else None
            if failed is None:
                return self._producer
            try:
                self._producer = KafkaProducer(**self._config)
            except KafkaError as e:  # broker still away: keep the old one, the next send tries again
                log.warning("reopening the Kafka producer failed", extra={"error": str(e)})
                return self._producer
            self._failed = None
        log.warning(
            "Kafka producer replaced after a failed send (a restarted broker forgets producer ids)",
            extra={"bootstrap": self.bootstrap},
        )
        try:
            failed.close(timeout=0)
        except Exception:  # noqa: BLE001 - best effort on a broken producer
            log.debug("closing the failed producer", exc_info=True)
        return self._producer

    def _mark_failed(self, producer: KafkaProducer) -> None:
        self._failed = producer

    def send(self, topic: str, msg: Message, key: Key, headers: Headers | None = None) -> FutureRecordMetadata:
        """Queue `msg` for `topic`; the future's `.get()` raises if the broker refuses it."""
        return self.send_bytes(topic, encode(msg), key, headers)

    def send_bytes(self, topic: str, value: bytes, key: Key, headers: Headers | None = None) -> FutureRecordMetadata:
        """Queue raw bytes: used to dead-letter a message exactly as it arrived."""
        if isinstance(key, str):
            key = key.encode()
        producer = self._current()
        future = producer.send(topic, value=value, key=key, headers=list((headers or {}).items()))
        future.add_callback(lambda _meta: PRODUCED.labels(topic).inc())
        future.add_errback(lambda _e: self._mark_failed(producer))
        return future

    def publish(
        self, topic: str, msg: Message, key: Key, headers: Headers | None = None, timeout: float = 30.0
    ) -> RecordMetadata:
        """Send `msg` and wait for the broker's acknowledgement; `PublishError` if none comes."""
        return self.publish_bytes(topic, encode(msg), key, headers, timeout)

    def publish_bytes(
        self, topic: str, value: bytes, key: Key, headers: Headers | None = None, timeout: float = 30.0
    ) -> RecordMetadata:
        """`publish` for raw bytes."""
        deadline = time.monotonic() + timeout
        producer = self._current()
        try:
            return self.send_bytes(topic, value, key, headers).get(timeout)
        except KafkaError as first:
            self._mark_failed(producer)  # the errback may not have run yet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(f"publishing to {topic!r} failed: {first}") from first
            try:  # on the producer that replaced the failed one
                return self.send_bytes(topic, value, key, headers).get(remaining)
            except KafkaError as e:
                raise PublishError(f"publishing to {topic!r} failed twice: {first}; then {e}") from e

    def publish_many(self, items: Iterable[tuple[str, Message, Key]], timeout: float = 30.0) -> list[RecordMetadata]:
        """Send every (topic, msg, key), then check every acknowledgement.

        Raises `PublishError` if any failed; the others may have been written, so a
        caller retries the whole batch and consumers drop duplicates by event_id.
        """
        pending, failures, total = [], [], 0
        for topic, msg, key in items:
            total += 1
            try:
                pending.append((topic, self.send(topic, msg, key)))
            except KafkaError as e:  # refused before sending: too large, no metadata
                failures.append(f"{topic!r}: {e}")
        deadline = time.monotonic() + timeout
        acked = []
        for topic, future in pending:
            try:
                acked.append(future.get(max(0.0, deadline - time.monotonic())))
            except KafkaError as e:
                failures.append(f"{topic!r}: {e}")
        if failures:
            raise PublishError(f"{len(failures)} of {total} events not acknowledged; first: {failures[0]}")
        return acked

    def flush(self, timeout: float | None = None) -> None:
        """Push queued sends out now (failures still surface only through their futures)."""
        self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to `timeout` seconds), then disconnect."""
        self._producer.close(timeout)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
