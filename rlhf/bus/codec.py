"""Event envelope: create, encode and strictly decode the protobuf events on Kafka.

Every event carries `schema_version` (bumped on incompatible change) and a unique
`event_id` that lets consumers drop redeliveries. A consumer refuses what it cannot
trust — garbage bytes, no event_id, a schema newer than it knows — with `DecodeError`,
and `EventConsumer` dead-letters such messages instead of retrying them forever.
"""

from __future__ import annotations

import time
import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.protobuf.message import Message

SCHEMA_VERSION = 1
"""The newest event schema this code reads and the one it writes."""

M = TypeVar("M", bound=Message)


class DecodeError(ValueError):
    """A Kafka message value that is not a usable event; the text says why."""


def new_event(cls: type[M], **fields) -> M:
    """A new `cls` event with schema_version, a fresh uuid4 event_id and created_unix_ms now.

    Fields given explicitly win, e.g. an outbox re-sending a stored event keeps its id.
    """
    fields.setdefault("schema_version", SCHEMA_VERSION)
    fields.setdefault("event_id", uuid.uuid4().hex)
    fields.setdefault("created_unix_ms", time.time_ns() // 1_000_000)
    return cls(**fields)


def encode(msg: Message) -> bytes:
    """Serialise an event; refuses one its consumers would dead-letter (build it with `new_event`)."""
    if not msg.event_id or not msg.schema_version:
        raise ValueError(f"{type(msg).__name__} has no event_id or schema_version; create it with new_event()")
    return msg.SerializeToString()


def decode(message_cls: type[M], data: bytes | None) -> M:
    """Parse `data` as `message_cls`, raising `DecodeError` unless it is a usable event."""
    name = message_cls.__name__
    if data is None:
        raise DecodeError(f"{name}: message has no value (tombstone)")
    msg = message_cls()
    try:
        msg.ParseFromString(data)
    except _ProtobufDecodeError as e:
        raise DecodeError(f"{name}: not a valid protobuf message ({e})") from e
    # Random bytes sometimes parse as unknown fields; a missing envelope catches them.
    if not msg.schema_version:
        raise DecodeError(f"{name}: missing schema_version")
    if msg.schema_version > SCHEMA_VERSION:
        raise DecodeError(f"{name}: schema_version {msg.schema_version} is newer than supported {SCHEMA_VERSION}")
    if not msg.event_id:
        raise DecodeError(f"{name}: missing event_id")
    return msg
