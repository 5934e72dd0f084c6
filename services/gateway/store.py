"""What the gateway remembers: each served response (so feedback can name it by id) and
the events it owes Kafka, in one SQLite file so both commit in one transaction."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from rlhf.bus import Topics, encode, new_event
from rlhf.outbox import Outbox, Synchronous, connect
from rlhf.v1 import common_pb2, events_pb2
from services.gateway.errors import ApiError
from services.gateway.schemas import ComparisonIn, RatingIn

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS responses (
        id              TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        prompt          TEXT NOT NULL,     -- JSON [{"role", "content"}]: the conversation before this answer
        text            TEXT NOT NULL,
        policy_version  INTEGER NOT NULL,
        created         REAL NOT NULL      -- unix seconds
    )""",
    "CREATE INDEX IF NOT EXISTS responses_created ON responses(created)",
)

Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class Served:
    id: str
    conversation_id: str
    prompt: str  # JSON, compared verbatim: two answers to the same prompt have equal strings
    text: str
    policy_version: int


def _chat(messages: Messages) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


class GatewayStore:
    """Feedback commits with the outbox's durability (FULL by default: a person's judgement
    cannot be asked for again); served responses and their Interaction event with
    `completion_synchronous` (NORMAL by default: they survive a gateway crash, and a
    completion does not wait for an fsync)."""

    def __init__(
        self,
        outbox: Outbox,
        topics: Topics,
        on_commit: Callable[[], None] = lambda: None,
        completion_synchronous: Synchronous = "NORMAL",
    ):
        self.outbox, self.topics, self.on_commit = outbox, topics, on_commit
        self.completion_synchronous = completion_synchronous
        outbox.submit(lambda c: [c.execute(s) for s in _SCHEMA]).result()
        # lookups run on the event loop: a primary-key read in WAL mode takes microseconds
        # and never waits for the writer
        self._read = connect(outbox.path)

    async def _commit(
        self, job: Callable[[sqlite3.Connection], object], synchronous: Synchronous | None = None
    ) -> object:
        result = await asyncio.wrap_future(self.outbox.submit(job, synchronous))
        self.on_commit()
        return result

    async def record_completion(
        self,
        conversation_id: str,
        prompt: Messages,
        responses: Sequence[tuple[str, str]],
        policy_version: int,
    ) -> events_pb2.Interaction:
        """Store the served (response_id, text) pairs and queue the Interaction event."""
        event = new_event(
            events_pb2.Interaction,
            conversation_id=conversation_id,
            prompt=_chat(prompt),
            response_ids=[r[0] for r in responses],
            responses=[r[1] for r in responses],
            policy_version=policy_version,
        )
        prompt_json, now, payload = json.dumps(prompt, ensure_ascii=False), time.time(), encode(event)

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO responses (id, conversation_id, prompt, text, policy_version, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(rid, conversation_id, prompt_json, text, policy_version, now) for rid, text in responses],
            )
            Outbox.put(conn, event.event_id, self.topics.interactions, conversation_id, payload)

        await self._commit(job, self.completion_synchronous)
        return event

    def lookup(self, response_id: str, field: str) -> Served:
        row = self._read.execute(
            "SELECT id, conversation_id, prompt, text, policy_version FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None:
            raise ApiError(
                404, f"{field}: no served response has id {response_id!r} (or it is older than the retention)", field
            )
        return Served(*row)

    async def add_feedback(self, fb: RatingIn | ComparisonIn) -> events_pb2.Feedback:
        """Resolve the ids to the served texts and queue the Feedback event (404 for unknown ids)."""
        common = dict(comment=fb.comment, corrected_answer=fb.corrected_answer, source=fb.source)
        if fb.event_id:
            common["event_id"] = fb.event_id
        if isinstance(fb, RatingIn):
            r = self.lookup(fb.response_id, "response_id")
            event = new_event(
                events_pb2.Feedback,
                conversation_id=r.conversation_id,
                prompt=_chat(json.loads(r.prompt)),
                rating=events_pb2.Rating(
                    response_id=r.id, response=r.text, value=fb.value, policy_version=r.policy_version
                ),
                **common,
            )
        else:
            if fb.chosen_id == fb.rejected_id:
                raise ApiError(422, "rejected_id: must differ from chosen_id", "rejected_id")
            chosen = self.lookup(fb.chosen_id, "chosen_id")
            rejected = self.lookup(fb.rejected_id, "rejected_id")
            if chosen.prompt != rejected.prompt:
                raise ApiError(
                    422,
                    "rejected_id: answers a different prompt than chosen_id; compare answers to the same prompt",
                    "rejected_id",
                )
            event = new_event(
                events_pb2.Feedback,
                conversation_id=chosen.conversation_id,
                prompt=_chat(json.loads(chosen.prompt)),
                comparison=events_pb2.Comparison(
                    chosen_id=chosen.id,
                    chosen=chosen.text,
                    rejected_id=rejected.id,
                    rejected=rejected.text,
                    chosen_policy_version=chosen.policy_version,
                    rejected_policy_version=rejected.policy_version,
                ),
                **common,
            )
        payload = encode(event)
        await self._commit(
            lambda c: Outbox.put(c, event.event_id, self.topics.feedback, event.conversation_id, payload)
        )
        return event

    async def prune_responses(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        return await self._commit(
            lambda c: c.execute("DELETE FROM responses WHERE created < ?", (cutoff,)).rowcount, "NORMAL"
        )  # type: ignore[return-value]

    def close(self) -> None:
        self._read.close()
