"""Is the broker there, and is each topic still the log we read? One watch per process and bootstrap.

A topic's *log identity* is "<cluster id>/<topic id>": Kafka gives every topic a UUID when
it is created (KIP-516, Kafka ≥ 2.8, returned in Metadata v10+), so a topic that was
deleted and created again, or a cluster rebuilt on empty disks, gets a new identity while
keeping its name. The embedded Tansu broker keeps topics in memory: each start creates
them again with new topic ids, and `EmbeddedBroker` also gives each start a fresh cluster
id, so a lost log is the same event there as on Apache Kafka. (A broker too old to send
topic ids leaves only the cluster id: a rebuilt cluster is still caught, a recreated topic
on the same cluster is not.)

Why not the offsets: a checkpointed offset past the log end does mean a lost log on
Kafka, but Tansu reports the end offset as the last *batch's* base offset + 1, so a
consumer that read a whole batch sits legitimately "past the end" there; and a new log
that has grown past the checkpoint by the time the consumer looks (the gateway's outbox
re-sends quickly) would not be noticed at all. The identity is exact on both.

Every `interval_s` the watch thread sends one Metadata request (DescribeCluster +
describe of the watched topics, kafka-python's admin client). Consumers compare their own
identity with it on each poll (`EventConsumer`); gRPC services and the gateway read
`healthy` for their `kafka` health (rlhf.serving.server). Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

from rlhf.bus.admin import admin_client
from rlhf.bus.metrics import CONNECTED

log = logging.getLogger(__name__)

_NO_TOPIC_ID = {None, "", "00000000-0000-0000-0000-000000000000", "AAAAAAAAAAAAAAAAAAAAAA"}


class KafkaWatch:
    """Broker reachability and the identity of each watched topic, refreshed every `interval_s`.

    watch = kafka_watch("127.0.0.1:9092")
    watch.watch("rlhf.feedback")
    watch.identity("rlhf.feedback")   # "rlhf-3f2a.../01a2...", None while unknown or missing
    watch.healthy                     # reachable and every watched topic exists
    """

    # timeout_s: short, so that a broker `rlhf up` restarts within a second or two is still seen
    # down (4 s hid it from the 10 s check of tests/e2e/test_restart.py).
    def __init__(self, bootstrap: str, interval_s: float = 2.0, timeout_s: float = 1.5):
        self.bootstrap, self.interval_s, self.timeout_s = bootstrap, interval_s, timeout_s
        self.service = ""  # the `service` label of rlhf_kafka_connected, named by the process
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()  # one Metadata round at a time (the admin client is not shared)
        self._topics: dict[str, int] = {}  # watched topic -> number of watchers
        self._ids: dict[str, str | None] = {}
        self._connected: bool | None = None  # None: not checked yet
        self._admin = None  # a KafkaAdminClient while connected
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._keepers = 0  # start()ed for health, not yet release()d: check even with no topic watched

    # ---- what callers use -------------------------------------------------------------

    def start(self, keep: bool = True) -> KafkaWatch:
        """Start the thread (idempotent). `keep`: check the broker even while no topic is
        watched (a service's health), until as many `release()` calls; `watch` starts it for
        as long as topics are watched. With neither, the thread closes its admin client and
        ends, so a process that outlives its broker (a test session) does not retry it forever."""
        with self._lock:
            self._keepers += 1 if keep else 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"kafka-watch-{self.bootstrap}", daemon=True)
                self._thread.start()
        return self

    def watch(self, *topics: str) -> None:
        with self._lock:
            for t in topics:
                self._topics[t] = self._topics.get(t, 0) + 1
        self.start(keep=False)

    def release(self) -> None:
        """Undo one `start(keep=True)` (a service stopping)."""
        with self._lock:
            self._keepers = max(0, self._keepers - 1)
        self._wake.set()

    def unwatch(self, *topics: str) -> None:
        with self._lock:
            for t in topics:
                n = self._topics.get(t, 0) - 1
                if n > 0:
                    self._topics[t] = n
                else:
                    self._topics.pop(t, None)
                    self._ids.pop(t, None)
        self._wake.set()

    def identity(self, topic: str, refresh: bool = False) -> str | None:
        """The log identity of `topic` as last seen (None: unknown, broker away, or no such
        topic); `refresh` asks the broker now instead (blocking, at most ~timeout_s)."""
        if refresh:
            self.check([topic])
        with self._lock:
            return self._ids.get(topic)

    def identities(self, topics: Iterable[str], refresh: bool = False) -> dict[str, str | None]:
        topics = list(topics)
        if refresh:
            self.check(topics)
        with self._lock:
            return {t: self._ids.get(t) for t in topics}

    @property
    def connected(self) -> bool:
        """True while the last Metadata round succeeded."""
        return bool(self._connected)

    @property
    def healthy(self) -> bool:
        """Reachable, and every watched topic exists: consumers can read and producers write."""
        with self._lock:
            return bool(self._connected) and all(self._ids.get(t) is not None for t in self._topics)

    def missing(self) -> list[str]:
        """Watched topics the broker does not have (right after a lost log, until they are created again)."""
        with self._lock:
            return sorted(t for t in self._topics if self._ids.get(t) is None) if self._connected else []

    # ---- the Metadata round -----------------------------------------------------------

    def check(self, extra: Iterable[str] = ()) -> bool:
        """One Metadata round now (the watched topics plus `extra`); returns reachability."""
        with self._lock:
            topics = sorted(set(self._topics) | set(extra))
        with self._check_lock:
            try:
                if self._admin is None:
                    self._admin = admin_client(
                        bootstrap_servers=self.bootstrap,
                        client_id="rlhf-watch",
                        bootstrap_timeout_ms=int(self.timeout_s * 1000),
                        request_timeout_ms=int(self.timeout_s * 1000),
                        reconnect_backoff_max_ms=500,
                    )
                cluster = self._admin.describe_cluster().get("cluster_id") or "?"
                found = {t["name"]: t for t in self._admin.describe_topics(topics)} if topics else {}
            except Exception as e:  # noqa: BLE001 - any failure means "not reachable now"
                self._close_admin()
                self._set_connected(False, str(e))
                return False
        ids: dict[str, str | None] = {}
        for t in topics:
            info = found.get(t)
            if info is None or info.get("error_code"):
                ids[t] = None  # no such topic (yet)
                continue
            topic_id = info.get("topic_id")
            # no topic id from a broker older than 2.8: the cluster id alone names the log
            ids[t] = f"{cluster}/{'-' if topic_id in _NO_TOPIC_ID else topic_id}"
        with self._lock:
            self._ids.update(ids)
        self._set_connected(True)
        return True

    def _set_connected(self, ok: bool, error: str = "") -> None:
        was, self._connected = self._connected, ok
        CONNECTED.labels(self.service).set(1 if ok else 0)
        if ok and was is False:
            log.warning("Kafka broker reachable again", extra={"bootstrap": self.bootstrap})
        elif not ok and was is not False:
            log.error("Kafka broker unreachable", extra={"bootstrap": self.bootstrap, "error": error})

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:  # noqa: BLE001 - best effort on a broken connection
                log.debug("closing the watch's admin client", exc_info=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not (self._keepers or self._topics):
                    # nobody needs it: a closed consumer's broker may be gone for good; the
                    # next start()/watch() starts a new thread
                    self._thread = None
                    break
            self.check()
            self._wake.wait(self.interval_s)
            self._wake.clear()
        with self._check_lock:
            self._close_admin()


_watches: dict[str, KafkaWatch] = {}
_watches_lock = threading.Lock()


def kafka_watch(bootstrap: str, service: str | None = None) -> KafkaWatch:
    """The process's watch of `bootstrap` (created on first use). `service` names the
    `service` label of rlhf_kafka_connected (the gRPC service or the gateway)."""
    with _watches_lock:
        watch = _watches.get(bootstrap)
        if watch is None:
            watch = _watches[bootstrap] = KafkaWatch(bootstrap)
    if service:
        watch.service = service
    return watch
