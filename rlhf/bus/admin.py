"""Broker reachability and idempotent topic creation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from kafka import KafkaAdminClient
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError, for_code

log = logging.getLogger(__name__)


class BrokerUnavailable(ConnectionError):
    """No Kafka broker answered at the bootstrap address in time."""


class MissingTopicError(LookupError):
    """A topic a consumer needs does not exist; create it with `ensure_topics`."""


@contextlib.contextmanager
def bootstrapping(bootstrap: str, timeout_s: float) -> Iterator[None]:
    """Turn kafka-python's bootstrap timeout into `BrokerUnavailable` saying what to fix."""
    try:
        yield
    except KafkaTimeoutError as e:
        raise BrokerUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:g}s: start one "
            f"(`rlhf broker` runs an embedded one) or fix the bootstrap address"
        ) from e


def admin_client(**config) -> KafkaAdminClient:
    """`KafkaAdminClient(**config)`, without leaking its IO thread when the broker is away.

    kafka-python 3.0's constructor starts a network thread and then bootstraps; when the
    bootstrap fails it raises before marking the client open, so `close()` is a no-op and the
    thread lives on. A process that retries a dead broker every few seconds (the broker
    watch) gained a thread per try: hundreds in a test session, and in a service waiting for
    its broker."""
    admin = KafkaAdminClient.__new__(KafkaAdminClient)
    try:
        admin.__init__(**config)
    except BaseException:
        for stop in (
            getattr(getattr(admin, "_client", None), "close", None),
            getattr(getattr(admin, "_net", None), "stop", None),
        ):
            if stop is not None:
                try:
                    stop()
                except Exception:  # noqa: BLE001 - the client is broken already; the raise below says why
                    log.debug("closing a half-built admin client", exc_info=True)
        raise
    return admin


def _admin(bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    with bootstrapping(bootstrap, timeout_s):
        # The constructor fetches cluster metadata, so success means the broker serves.
        # A short backoff cap keeps retrying a broker that is still starting.
        return admin_client(
            bootstrap_servers=bootstrap,
            client_id="rlhf-admin",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            reconnect_backoff_max_ms=1000,
        )


def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Block until a Kafka client can fetch metadata from `bootstrap`, else `BrokerUnavailable`."""
    _admin(bootstrap, timeout_s).close()


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = 1,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create whichever of `topics` do not exist yet; returns those it created.

    Idempotent and safe to race: a topic that already exists (or that another process
    creates meanwhile) is left as it is, partition count included.
    """
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return []
    admin = _admin(bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return []
        spec = {"num_partitions": partitions, "replication_factor": replication_factor}
        result = admin.create_topics({t: dict(spec) for t in missing}, raise_errors=False)
        created = []
        for topic in result["topics"]:
            error = for_code(topic["error_code"])
            if error is TopicAlreadyExistsError:
                continue
            if topic["error_code"]:
                raise error(f"creating topic {topic['name']!r}: {topic['error_message'] or error.__name__}")
            created.append(topic["name"])
        # CreateTopics returns before every broker's metadata shows the topic (KRaft);
        # wait, so a consumer started right after finds its partitions.
        admin.wait_for_topics(created, timeout_ms=int(timeout_s * 1000))
        return created
    finally:
        admin.close()
