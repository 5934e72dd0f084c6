"""What the gateway remembers: each served response (so feedback can name it by id), each
feedback it accepted (for GET /v1/feedback and to find the vote a later one supersedes),
and the events it owes Kafka, in one SQLite file so all commit in one transaction."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from google.protobuf.json_format import MessageToDict

from rlhf.bus import Topics, encode, new_event
from rlhf.outbox import Outbox, Synchronous, connect
from rlhf.v1 import common_pb2, events_pb2
from services.gateway.errors import ApiError
from services.gateway.guard import ANONYMOUS, Rater
from services.gateway.metrics import PII_REDACTIONS
from services.gateway.redact import TYPES, Redactor
from services.gateway.schemas import ComparisonIn, RatingIn

OUTCOMES = {
    "chosen": events_pb2.COMPARISON_OUTCOME_CHOSEN,
    "tie": events_pb2.COMPARISON_OUTCOME_TIE,
    "both_bad": events_pb2.COMPARISON_OUTCOME_BOTH_BAD,
}
MAX_PAGE = 1000  # most events one GET /v1/feedback page returns

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS responses (
        id              TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        prompt          TEXT NOT NULL,     -- JSON [{"role", "content"}]: the conversation before this answer
        text            TEXT NOT NULL,
        policy_version  INTEGER NOT NULL,
        created         REAL NOT NULL,     -- unix seconds
        redacted        INTEGER NOT NULL DEFAULT 0  -- 1: prompt and text went through the PII redactor
    )""",
    "CREATE INDEX IF NOT EXISTS responses_created ON responses(created)",
    """CREATE TABLE IF NOT EXISTS feedback (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- the export's cursor
        event_id        TEXT NOT NULL UNIQUE,
        created_ms      INTEGER NOT NULL,
        conversation_id TEXT NOT NULL,
        rater_id        TEXT NOT NULL,     -- '' anonymous
        response_a      TEXT NOT NULL,     -- the rated answer, or the chosen one
        response_b      TEXT NOT NULL,     -- '' for a rating, else the rejected one
        target          TEXT NOT NULL,     -- what a later vote of the same rater supersedes
        superseded_by   TEXT NOT NULL DEFAULT '',
        event           TEXT NOT NULL      -- the Feedback event as JSON (redacted, as published)
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_created ON feedback(created_ms)",
    "CREATE INDEX IF NOT EXISTS feedback_conversation ON feedback(conversation_id)",
    "CREATE INDEX IF NOT EXISTS feedback_rater_target ON feedback(rater_id, target)",
    "CREATE INDEX IF NOT EXISTS feedback_response_a ON feedback(response_a)",
    "CREATE INDEX IF NOT EXISTS feedback_response_b ON feedback(response_b)",
)


def _migrate(conn: sqlite3.Connection) -> None:
    """A file from before redaction: its rows are marked unredacted, so feedback redacts them."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
    if "redacted" not in columns:
        conn.execute("ALTER TABLE responses ADD COLUMN redacted INTEGER NOT NULL DEFAULT 0")


Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class Served:
    id: str
    conversation_id: str
    prompt: str  # JSON, compared verbatim: two answers to the same prompt have equal strings
    text: str
    policy_version: int
    redacted: bool


def _chat(messages: Messages) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


class Scrubber:
    """The PII redactor with its counter, or (redact_pii off) the identity."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._redactor = Redactor()
        for kind in TYPES:
            PII_REDACTIONS.labels(kind)  # every type exported from the start, at 0

    def __call__(self, text: str) -> str:
        if not self.enabled:
            return text
        text, counts = self._redactor.redact(text)
        for kind, n in counts.items():
            PII_REDACTIONS.labels(kind).inc(n)
        return text

    def messages(self, messages: Messages) -> Messages:
        return [{**m, "content": self(m["content"])} for m in messages] if self.enabled else messages


class GatewayStore:
    """Feedback commits with the outbox's durability (FULL by default: a person's judgement
    cannot be asked for again); served responses and their Interaction event with
    `completion_synchronous` (NORMAL by default: they survive a gateway crash, and a
    completion does not wait for an fsync).

    With `redact_pii`, text is redacted before it is stored or queued: a completion's prompt
    and answers (so its Interaction, and every later feedback that copies them), and a
    feedback's comment and corrected answer; a stored row not yet redacted (written while
    redaction was off) is redacted when a feedback copies it."""

    def __init__(
        self,
        outbox: Outbox,
        topics: Topics,
        on_commit: Callable[[], None] = lambda: None,
        completion_synchronous: Synchronous = "NORMAL",
        redact_pii: bool = True,
    ):
        self.outbox, self.topics, self.on_commit = outbox, topics, on_commit
        self.completion_synchronous = completion_synchronous
        self.scrub = Scrubber(redact_pii)

        def schema(conn: sqlite3.Connection) -> None:
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)

        outbox.submit(schema).result()
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
        prompt = self.scrub.messages(prompt)
        responses = [(rid, self.scrub(text)) for rid, text in responses]
        redacted = int(self.scrub.enabled)
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
                "INSERT INTO responses (id, conversation_id, prompt, text, policy_version, created, redacted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(rid, conversation_id, prompt_json, text, policy_version, now, redacted) for rid, text in responses],
            )
            Outbox.put(conn, event.event_id, self.topics.interactions, conversation_id, payload)

        await self._commit(job, self.completion_synchronous)
        return event

    def _row(self, response_id: str):
        return self._read.execute(
            "SELECT id, conversation_id, prompt, text, policy_version, redacted FROM responses WHERE id = ?",
            (response_id,),
        ).fetchone()

    def lookup(self, response_id: str, field: str) -> Served:
        """The served response `response_id` names: a choice's response_id, or a completion's
        top-level id when that completion had exactly one choice (its `<id>-0`)."""
        row = self._row(response_id)
        if row is None and self._row(f"{response_id}-1") is None:
            row = self._row(f"{response_id}-0")
        elif row is None:
            raise ApiError(
                422,
                f"{field}: completion {response_id!r} has several choices; name one by its response_id",
                field,
            )
        if row is None:
            raise ApiError(
                404, f"{field}: no served response has id {response_id!r} (or it is older than the retention)", field
            )
        return Served(*row[:5], redacted=bool(row[5]))

    def _prompt_of(self, served: Served) -> list[common_pb2.ChatMessage]:
        prompt = json.loads(served.prompt)
        return _chat(prompt if served.redacted else self.scrub.messages(prompt))

    def _text_of(self, served: Served) -> str:
        return served.text if served.redacted else self.scrub(served.text)

    async def add_feedback(self, fb: RatingIn | ComparisonIn, rater: Rater = ANONYMOUS) -> events_pb2.Feedback:
        """Resolve the ids to the served texts and queue the Feedback event (404 for unknown ids).

        The event supersedes (Feedback.supersedes_event_id) the rater's latest earlier
        feedback on the same target: the same response for a rating, the same two answers
        (in either order) for a comparison; or the event named by `supersedes`, which must be
        the same rater's (422 otherwise). Anonymous feedback supersedes nothing."""
        common = dict(
            comment=self.scrub(fb.comment),
            corrected_answer=self.scrub(fb.corrected_answer),
            source=fb.source,
            rater_id=rater.id,
            anonymous=rater.anonymous,
            scores=[
                events_pb2.NamedScore(name=k, value=v)
                if isinstance(v, (int, float))
                else events_pb2.NamedScore(name=k, category=self.scrub(v))
                for k, v in fb.scores.items()
            ],
            tags=fb.tags,
            metadata={k: self.scrub(v) for k, v in fb.metadata.items()},
        )
        if fb.event_id:
            common["event_id"] = fb.event_id
        if isinstance(fb, RatingIn):
            r = self.lookup(fb.response_id or "", "response_id")
            event = new_event(
                events_pb2.Feedback,
                conversation_id=r.conversation_id,
                prompt=self._prompt_of(r),
                rating=events_pb2.Rating(
                    response_id=r.id, response=self._text_of(r), value=fb.value, policy_version=r.policy_version
                ),
                **common,
            )
            a, b, target = r.id, "", f"rating:{r.id}"
        else:
            if fb.chosen_id == fb.rejected_id:
                raise ApiError(422, "rejected_id: must differ from chosen_id", "rejected_id")
            chosen = self.lookup(fb.chosen_id, "chosen_id")
            rejected = self.lookup(fb.rejected_id, "rejected_id")
            if chosen.id == rejected.id:
                raise ApiError(422, "rejected_id: names the same answer as chosen_id", "rejected_id")
            if chosen.prompt != rejected.prompt:
                raise ApiError(
                    422,
                    "rejected_id: answers a different prompt than chosen_id; compare answers to the same prompt",
                    "rejected_id",
                )
            event = new_event(
                events_pb2.Feedback,
                conversation_id=chosen.conversation_id,
                prompt=self._prompt_of(chosen),
                comparison=events_pb2.Comparison(
                    chosen_id=chosen.id,
                    chosen=self._text_of(chosen),
                    rejected_id=rejected.id,
                    rejected=self._text_of(rejected),
                    chosen_policy_version=chosen.policy_version,
                    rejected_policy_version=rejected.policy_version,
                    outcome=OUTCOMES[fb.outcome],
                ),
                **common,
            )
            a, b = chosen.id, rejected.id
            target = "comparison:" + ":".join(sorted((a, b)))
        explicit = fb.supersedes

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM feedback WHERE event_id = ?", (event.event_id,)).fetchone():
                return  # a retry of an event already stored: stored once, queued once
            old = None
            if explicit:
                row = conn.execute("SELECT rater_id FROM feedback WHERE event_id = ?", (explicit,)).fetchone()
                if row is None or rater.anonymous or row[0] != rater.id:
                    raise ApiError(
                        422, f"supersedes: no feedback event {explicit!r} of this rater to supersede", "supersedes"
                    )
                old = explicit
            elif not rater.anonymous:
                row = conn.execute(
                    "SELECT event_id FROM feedback WHERE rater_id = ? AND target = ? AND superseded_by = '' "
                    "ORDER BY seq DESC LIMIT 1",
                    (rater.id, target),
                ).fetchone()
                old = row[0] if row else None
            if old:
                event.supersedes_event_id = old
                conn.execute("UPDATE feedback SET superseded_by = ? WHERE event_id = ?", (event.event_id, old))
            conn.execute(
                "INSERT INTO feedback (event_id, created_ms, conversation_id, rater_id, response_a, response_b, "
                "target, event) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.event_id,
                    event.created_unix_ms,
                    event.conversation_id,
                    rater.id,
                    a,
                    b,
                    target,
                    json.dumps(MessageToDict(event, preserving_proto_field_name=True), ensure_ascii=False),
                ),
            )
            Outbox.put(conn, event.event_id, self.topics.feedback, event.conversation_id, encode(event))

        await self._commit(job)
        return event

    def list_feedback(
        self,
        *,
        conversation_id: str | None = None,
        response_id: str | None = None,
        rater_id: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> tuple[list[dict], int | None]:
        """Stored feedback events, oldest first, after cursor `after`, filtered; returns
        (events as JSON objects with `superseded_by`, the next cursor or None at the end)."""
        where, args = ["seq > ?"], [after]
        for column, value in (("conversation_id", conversation_id), ("rater_id", rater_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if response_id is not None:
            where.append("(response_a = ? OR response_b = ?)")
            args += [response_id, response_id]
        if since_ms is not None:
            where.append("created_ms >= ?")
            args.append(since_ms)
        if until_ms is not None:
            where.append("created_ms < ?")
            args.append(until_ms)
        rows = self._read.execute(
            f"SELECT seq, event, superseded_by FROM feedback WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        page = [{**json.loads(event), "superseded_by": by} for _, event, by in rows[:limit]]
        return page, (rows[limit - 1][0] if len(rows) > limit else None)

    async def prune_responses(self, older_than_s: float) -> int:
        """Served responses (and feedback rows) older than `older_than_s`: feedback can no longer name them."""
        cutoff = time.time() - older_than_s

        def job(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM feedback WHERE created_ms < ?", (int(cutoff * 1000),))
            return c.execute("DELETE FROM responses WHERE created < ?", (cutoff,)).rowcount

        return await self._commit(job, "NORMAL")  # type: ignore[return-value]

    def close(self) -> None:
        self._read.close()
