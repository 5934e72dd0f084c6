"""Durable outbox: events committed to SQLite first, relayed to Kafka after.

A request that produces an event (a person's feedback, a live prompt) commits it to a
local SQLite table in the same transaction as whatever else the request wrote, and only
then answers. A relay thread publishes pending rows and marks them sent only after the
broker acknowledged them, so a broker outage delays events but never loses one. A row
can be published twice (acked, then the process dies before marking it): consumers drop
duplicates by the event's `event_id` (rlhf.bus.codec), which is also the row's key here.

All writes go through one writer thread that commits queued jobs together (group
commit): one fsync covers every request that arrived meanwhile, so durability costs one
disk flush per batch, not per request. Each job says how durable its commit must be
(SQLite's `synchronous`): FULL fsyncs the WAL before the job's future resolves and
survives a power cut; NORMAL survives a crash of the process, not of the machine, and
costs no fsync. A batch commits FULL if any of its jobs asks for FULL.

A lost log: each row remembers the identity of the log the broker acknowledged it into
(`log_id`, cluster id + topic id, rlhf.bus.watch). When a topic's identity changes — the
in-memory embedded broker restarted, or a topic or cluster was recreated — the relay puts
every row acknowledged into another log back to pending and sends it again (ERROR line,
rlhf_kafka_log_resets_total, rlhf_outbox_resent_total), so the new log holds every event
the outbox still has; consumers drop what they had already processed by event_id. The
window is the outbox's retention (`Relay.retention`, the gateway's
outbox_retention_seconds, 1 h by default): older acknowledged rows are pruned, and by then
their effect is in the consumers' checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from prometheus_client import Counter, Gauge

from rlhf.bus import EventProducer, PublishError, ensure_topics, kafka_watch
from rlhf.bus.metrics import LOG_RESETS

log = logging.getLogger(__name__)

BACKLOG = Gauge("rlhf_outbox_backlog", "Outbox events not yet acknowledged by the broker")
OLDEST_AGE = Gauge("rlhf_outbox_oldest_age_seconds", "Age of the oldest unacknowledged outbox event (0 when empty)")
RELAYED = Counter("rlhf_outbox_relayed_total", "Outbox events the broker acknowledged, by topic", ["topic"])
RELAY_ERRORS = Counter("rlhf_outbox_relay_errors_total", "Relay attempts that failed (the rows stay pending)")
RESENT = Counter(
    "rlhf_outbox_resent_total", "Acknowledged outbox events sent again because their log was lost, by topic", ["topic"]
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- relay order
    event_id TEXT    NOT NULL UNIQUE,
    topic    TEXT    NOT NULL,
    key      BLOB,
    payload  BLOB    NOT NULL,                    -- the encoded protobuf event
    created  REAL    NOT NULL,                    -- unix seconds
    attempts INTEGER NOT NULL DEFAULT 0,
    sent     REAL,                                -- unix seconds of the broker's ack; NULL = pending
    log_id   TEXT                                 -- identity of the log that acknowledged it (rlhf.bus.watch)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(seq) WHERE sent IS NULL;
"""

Synchronous = Literal["FULL", "NORMAL"]


def connect(path: Path, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """A connection in WAL mode: readers never block the writer, and the writer commits with
    one WAL append. FULL fsyncs each commit (survives power loss); NORMAL only a crash.
    A FULL commit also makes every earlier NORMAL commit durable (one WAL, synced in order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@dataclass(frozen=True)
class Row:
    seq: int
    event_id: str
    topic: str
    key: bytes | None
    payload: bytes
    created: float
    attempts: int


Job = Callable[[sqlite3.Connection], Any]


class Outbox:
    """The outbox table plus the single writer thread for its database file.

    Other tables may live in the same file (the gateway keeps its served responses there)
    so that a job writes them and its events atomically: `await submit(job)` runs
    `job(conn)` inside a transaction, and the future resolves only after the commit.
    """

    def __init__(self, path: Path, synchronous: Synchronous = "FULL", max_batch: int = 256):
        """`synchronous`: the default durability of a job's commit (see the module doc)."""
        self.path = Path(path)
        self.synchronous, self.max_batch = synchronous, max_batch
        self._conn = connect(self.path, synchronous)
        self._conn.executescript(_SCHEMA)
        if "log_id" not in {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}:
            # an outbox from before log ids: its sent rows (log_id NULL) are re-sent once
            self._conn.execute("ALTER TABLE outbox ADD COLUMN log_id TEXT")
        self._mode = synchronous
        self._read = connect(self.path)
        self._read_lock = threading.Lock()
        self._jobs: queue.Queue[tuple[Job, concurrent.futures.Future, Synchronous] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._writer.start()

    # ---- writing -------------------------------------------------------------------

    def submit(self, job: Job, synchronous: Synchronous | None = None) -> concurrent.futures.Future:
        """Run `job(conn)` in the writer's next transaction; the future holds its result once
        committed (`synchronous`, default the outbox's), or the exception it raised (its
        writes then rolled back, the other jobs' kept)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future, synchronous or self.synchronous))
        return future

    @staticmethod
    def put(conn: sqlite3.Connection, event_id: str, topic: str, key: str | bytes | None, payload: bytes) -> None:
        """Inside a job: add one event. Re-adding an event_id is a no-op (idempotent retries)."""
        if isinstance(key, str):
            key = key.encode()
        conn.execute(
            "INSERT OR IGNORE INTO outbox (event_id, topic, key, payload, created) VALUES (?, ?, ?, ?, ?)",
            (event_id, topic, key, payload, time.time()),
        )

    def _write_loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Job, concurrent.futures.Future, Synchronous]]) -> None:
        results: list[tuple[concurrent.futures.Future, bool, Any]] = []
        mode: Synchronous = "FULL" if any(s == "FULL" for _, _, s in batch) else "NORMAL"
        if mode != self._mode:  # only outside a transaction
            self._conn.execute(f"PRAGMA synchronous={mode}")
            self._mode = mode
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for i, (job, future, _) in enumerate(batch):
                if not future.set_running_or_notify_cancel():
                    continue
                # a savepoint per job: one job's failure must not undo the others
                self._conn.execute(f"SAVEPOINT j{i}")
                try:
                    result = job(self._conn)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._conn.execute(f"ROLLBACK TO j{i}")
                    self._conn.execute(f"RELEASE j{i}")
                    results.append((future, False, e))
                else:
                    self._conn.execute(f"RELEASE j{i}")
                    results.append((future, True, result))
            self._conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - the whole batch failed: tell every caller
            log.exception("outbox transaction failed")
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            for _, future, _ in batch:
                if future.running():
                    future.set_exception(e)
            return
        for future, ok, value in results:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    # ---- relaying ------------------------------------------------------------------

    def pending(self, limit: int) -> list[Row]:
        """The oldest `limit` unacknowledged events, in commit order."""
        with self._read_lock:
            rows = self._read.execute(
                "SELECT seq, event_id, topic, key, payload, created, attempts FROM outbox "
                "WHERE sent IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [Row(*r) for r in rows]

    def mark_sent(self, seqs: Sequence[int] | dict[int, str | None]) -> concurrent.futures.Future:
        """Rows the broker acknowledged; a {seq: log identity} mapping also records which log
        holds each (None or a bare sequence: unknown, re-sent at the next identity check)."""
        now = time.time()
        log_ids = seqs if isinstance(seqs, dict) else dict.fromkeys(seqs)
        # NORMAL: losing a "sent" mark in a power cut only means a resend, which consumers drop
        return self.submit(
            lambda c: c.executemany(
                "UPDATE outbox SET sent = ?, log_id = ? WHERE seq = ?", [(now, lid, s) for s, lid in log_ids.items()]
            ),
            "NORMAL",
        )

    def requeue_lost(self, topic: str, log_id: str) -> concurrent.futures.Future:
        """Put back to pending every row of `topic` acknowledged into a log other than
        `log_id` (or into an unknown one); the future holds (rows requeued, their old log ids)."""
        where = "topic = ? AND sent IS NOT NULL AND (log_id IS NULL OR log_id != ?)"

        def job(c: sqlite3.Connection) -> tuple[int, list[str | None]]:
            old = [r[0] for r in c.execute(f"SELECT DISTINCT log_id FROM outbox WHERE {where}", (topic, log_id))]
            n = c.execute(f"UPDATE outbox SET sent = NULL, log_id = NULL WHERE {where}", (topic, log_id)).rowcount
            return n, old

        # NORMAL: a requeue lost in a power cut is done again at the next start (the rows still name the old log)
        return self.submit(job, "NORMAL")

    def topics(self) -> list[str]:
        """Every topic the outbox holds rows for."""
        with self._read_lock:
            return [r[0] for r in self._read.execute("SELECT DISTINCT topic FROM outbox")]

    def mark_failed(self, seqs: Sequence[int]) -> concurrent.futures.Future:
        return self.submit(
            lambda c: c.executemany("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", [(s,) for s in seqs]),
            "NORMAL",
        )

    def prune(self, sent_before: float) -> concurrent.futures.Future:
        """Forget events acknowledged before `sent_before` (unix seconds)."""
        return self.submit(lambda c: c.execute("DELETE FROM outbox WHERE sent < ?", (sent_before,)).rowcount, "NORMAL")

    def stats(self) -> tuple[int, float]:
        """(pending events, age in seconds of the oldest pending one, 0 when none)."""
        with self._read_lock:
            count, oldest = self._read.execute(
                "SELECT COUNT(*), MIN(created) FROM outbox WHERE sent IS NULL"
            ).fetchone()
        return count, (max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    def close(self) -> None:
        """Commit what is queued, then close the database."""
        self._jobs.put(None)
        self._writer.join()
        self._conn.close()
        self._read.close()


class Publisher(Protocol):
    def publish_rows(self, rows: Sequence[Row], timeout: float) -> dict[int, str | None]:
        """Publish rows; return {seq: identity of the log that acknowledged it} for the rows
        the broker acknowledged. Raise if none could be tried."""

    def log_ids(self, topics: Sequence[str]) -> dict[str, str | None]:
        """The identity of each topic's log as last seen (None: unknown or no such topic)."""

    def close(self) -> None: ...


class KafkaPublisher:
    """Publishes outbox rows with rlhf.bus.EventProducer (acks=all), created lazily and
    recreated after a failure: a restarted broker forgets the idempotent producer's id.
    On each (re)connection it creates `topics` if missing, as a fresh broker may lack them.
    The process's `KafkaWatch` of `bootstrap` says which log each topic is (and feeds the
    gateway's `kafka` readiness); `service` names it in rlhf_kafka_connected."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str = "rlhf-outbox",
        topics: Sequence[str] = (),
        connect_timeout: float = 5.0,
        service: str | None = None,
    ):
        self.bootstrap, self.client_id, self.connect_timeout = bootstrap, client_id, connect_timeout
        self.topics = list(topics)
        self._producer = None
        self.watch = kafka_watch(bootstrap, service=service or client_id.removeprefix("rlhf-"))
        self.watch.watch(*self.topics)
        self._watched = set(self.topics)

    def log_ids(self, topics: Sequence[str], refresh: bool = False) -> dict[str, str | None]:
        new = set(topics) - self._watched
        if new:  # a topic the relay met in a row: watched from now on
            self.watch.watch(*new)
            self._watched |= new
        return self.watch.identities(topics, refresh=refresh)

    def publish_rows(self, rows: Sequence[Row], timeout: float) -> dict[int, str | None]:
        if self._producer is None:
            if self.topics:
                ensure_topics(self.bootstrap, self.topics, timeout_s=self.connect_timeout)
            self._producer = EventProducer(self.bootstrap, self.client_id, bootstrap_timeout_s=self.connect_timeout)
        # Asked before sending: a row is never recorded under a newer log than the one that
        # took it (a broker that restarts meanwhile makes the record older: a harmless resend).
        ids = self.log_ids(sorted({r.topic for r in rows}), refresh=True)
        futures = [(r, self._producer.send_bytes(r.topic, r.payload, r.key)) for r in rows]
        deadline = time.monotonic() + timeout
        acked: dict[int, str | None] = {}
        failed = 0
        for row, future in futures:
            try:
                future.get(max(0.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - any failure leaves the row pending
                failed += 1
                if failed == 1:
                    log.warning("publish failed", extra={"topic": row.topic, "error": str(e)})
            else:
                acked[row.seq] = ids.get(row.topic)
                RELAYED.labels(row.topic).inc()
        if failed:
            self.close()
            if not acked:
                raise PublishError(f"{failed} of {len(rows)} events not acknowledged")
        return acked

    def close(self) -> None:
        self.watch.unwatch(*self._watched)
        self._watched = set()
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - best effort on a broken connection
                log.debug("closing producer", exc_info=True)


class Relay:
    """Thread that moves pending outbox rows to the broker.

    Each round publishes up to `batch` rows and marks the acknowledged ones sent. After a
    failure it waits with exponential backoff (interval · 2^k, capped at `max_backoff`);
    rows that failed are retried in later rounds, after newer ones may have gone out
    (redelivery and reordering are both harmless: consumers key on event_id).
    """

    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        interval: float = 0.2,
        batch: int = 500,
        max_backoff: float = 10.0,
        publish_timeout: float = 10.0,
        retention: float = 3600.0,
    ):
        self.outbox, self.publisher = outbox, publisher
        self.interval, self.batch, self.max_backoff = interval, batch, max_backoff
        self.publish_timeout, self.retention = publish_timeout, retention
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        self._topics: set[str] | None = None  # topics with rows (read once, then grown by what is sent)
        self._log_ids: dict[str, str] = {}  # identity of each topic's log at the last check

    def start(self) -> Relay:
        self._thread.start()
        return self

    def wake(self) -> None:
        """New rows were committed: relay now instead of at the next tick."""
        self._wake.set()

    def check_logs(self) -> int:
        """Requeue the rows of every topic whose log changed since the last check; returns how many."""
        if self._topics is None:
            self._topics = set(self.outbox.topics()) | set(getattr(self.publisher, "topics", ()))
        total = 0
        for topic, log_id in self.publisher.log_ids(sorted(self._topics)).items():
            if log_id is None or log_id == self._log_ids.get(topic):
                continue  # unknown now (broker away, topic not created again yet), or unchanged
            n, old = self.outbox.requeue_lost(topic, log_id).result()
            self._log_ids[topic] = log_id
            if n:
                total += n
                LOG_RESETS.labels(topic).inc()
                RESENT.labels(topic).inc(n)
                log.error(
                    "Kafka log of %s lost: %d acknowledged outbox events were in log(s) %s, not in %s; "
                    "sending them again",
                    topic,
                    n,
                    ", ".join(str(o) for o in old),
                    log_id,
                    extra={"topic": topic, "events": n, "old_logs": [str(o) for o in old], "new_log": log_id},
                )
        return total

    def run_once(self) -> int:
        """One round; returns how many rows were acknowledged."""
        self.check_logs()
        rows = self.outbox.pending(self.batch)
        if not rows:
            return 0
        self._topics |= {r.topic for r in rows}
        try:
            acked = self.publisher.publish_rows(rows, self.publish_timeout)
        except Exception:
            self.outbox.mark_failed([r.seq for r in rows]).result()
            raise
        if acked:
            self.outbox.mark_sent(acked).result()
        failed = [r.seq for r in rows if r.seq not in acked]
        if failed:
            self.outbox.mark_failed(failed).result()
            RELAY_ERRORS.inc()
        return len(acked)

    def _update_gauges(self) -> None:
        backlog, age = self.outbox.stats()
        BACKLOG.set(backlog)
        OLDEST_AGE.set(age)

    def _loop(self) -> None:
        failures, last_prune = 0, 0.0
        while not self._stop.is_set():
            try:
                sent = self.run_once()
                failures = 0
            except Exception as e:  # noqa: BLE001 - logged; the rows stay pending
                RELAY_ERRORS.inc()
                failures += 1
                sent = 0
                log.warning("relay round failed; retrying", extra={"error": str(e), "failures": failures})
            try:
                self._update_gauges()
                if time.time() - last_prune > 60:
                    last_prune = time.time()
                    self.outbox.prune(time.time() - self.retention)
            except Exception:  # noqa: BLE001 - gauges and pruning are best effort
                log.exception("outbox bookkeeping failed")
            if sent >= self.batch:
                continue  # a full batch went out: more is probably waiting
            delay = self.interval if failures == 0 else min(self.max_backoff, self.interval * 2**failures)
            self._wake.wait(delay)
            self._wake.clear()

    def stop(self, flush_timeout: float = 0.0) -> None:
        """Stop the thread; with `flush_timeout`, first try that long to send what is pending."""
        deadline = time.monotonic() + flush_timeout
        while flush_timeout and time.monotonic() < deadline and self.outbox.stats()[0]:
            self.wake()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.publisher.close()
        self._update_gauges()
