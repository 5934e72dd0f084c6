"""The worker's two Kafka inputs, polled by one task.

- rlhf.policy-updates: every PolicyUpdate (any action) the learner publishes opens a new
  backpressure budget (budget.py); read from the start under a never-committed group, so
  a restarted worker knows the learner's last version at once.
- rlhf.interactions: live prompts, under the worker's consumer group. A prompt's offset is
  committed once it is done with: its group published or dropped, or the prompt let go
  (dead-lettered, nothing to answer, pushed out of a full buffer). Per partition the commit is
  the lowest offset not done yet, so a worker that dies leaves the prompts it had waiting or
  in flight to be read again (at least once: a prompt may be sampled twice, never lost;
  the learner's ledger de-duplicates rollouts by event id, but a prompt sampled twice is two
  groups of fresh samples, not a duplicate). An empty or oversized prompt is dead-lettered
  to rlhf.interactions.dlq with the reason instead (sources.live_prompt_problem).

With membership=group (GroupConfig) the workers of one group id share the partitions of
rlhf.interactions, and with them the learner's budget (budget.py). Before partitions go to
another worker, what is done of them is committed and their waiting prompts are dropped
here; the new owner reads them from that commit. (Kafka's eager rebalance revokes every
partition and assigns most back: those that come back keep their waiting prompts.)
Without live prompts (live_fraction 0) a worker still joins the group: its partitions are
its share of the budget.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

from kafka.errors import KafkaError

from rlhf.bus import EventConsumer, Topics, ensure_topics
from rlhf.bus.consumer import GroupConfig
from rlhf.rollout import metrics
from rlhf.rollout.sources import PromptItem, PromptMixer, live_prompt_problem
from rlhf.rollout.worker import RolloutLoop
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


# How long a commit of live-prompt offsets may take before the next poll retries it.
COMMIT_TIMEOUT_MS = 2000

# The reward service's default reward_max_prompt_chars: it would refuse to score a longer prompt.
MAX_LIVE_PROMPT_CHARS = 16_000


class LiveOffsets:
    """Per partition: the offsets read and the live prompts not done with yet; what may be
    committed is the lowest offset not done (or past everything read). Thread-safe: the
    polling thread reads and commits, the rollout tasks mark prompts done."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next: dict[int, int] = {}  # past the last offset read
        self._pending: dict[int, set[int]] = {}  # offsets read and not done with
        self._committed: dict[int, int] = {}

    def read(self, partition: int, offset: int, pending: bool) -> None:
        with self._lock:
            self._next[partition] = max(self._next.get(partition, 0), offset + 1)
            if pending:
                self._pending.setdefault(partition, set()).add(offset)

    def already_read(self, partition: int, offset: int) -> bool:
        """A record this worker has read before (a client that rewinds a partition it kept
        through a rebalance to the group's commit hands those again)."""
        with self._lock:
            return offset < self._next.get(partition, 0)

    def forget_all(self) -> None:
        with self._lock:
            for d in (self._next, self._pending, self._committed):
                d.clear()

    def done(self, partition: int, offset: int) -> None:
        with self._lock:
            self._pending.get(partition, set()).discard(offset)

    def to_commit(self, partitions: list[int] | None = None) -> dict[int, int]:
        """{partition: offset} that moved since the last `committed` (of `partitions` only)."""
        with self._lock:
            out = {}
            for p, nxt in self._next.items():
                if partitions is not None and p not in partitions:
                    continue
                pending = self._pending.get(p)
                offset = min(pending) if pending else nxt
                if self._committed.get(p) != offset:
                    out[p] = offset
            return out

    def committed(self, offsets: dict[int, int]) -> None:
        with self._lock:
            self._committed.update(offsets)

    def forget(self, partitions: list[int]) -> None:
        with self._lock:
            for p in partitions:
                for d in (self._next, self._pending, self._committed):
                    d.pop(p, None)


class BusFeeds:
    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        group_id: str,
        use_live: bool,
        max_prompt_chars: int = MAX_LIVE_PROMPT_CHARS,
        group: GroupConfig | None = None,
    ):
        self.bootstrap, self.topics, self.group_id, self.use_live = bootstrap, topics, group_id, use_live
        self.max_prompt_chars = max_prompt_chars
        self.group = group or GroupConfig()
        self.updates: EventConsumer | None = None
        self.interactions: EventConsumer | None = None
        self.offsets = LiveOffsets()
        self._rebalanced = threading.Event()  # set on the polling thread; handled on the event loop
        self._revoked: set[int] = set()
        self._revoked_lock = threading.Lock()

    @property
    def sharing(self) -> bool:
        return self.group.membership == "group"

    def open(self) -> None:
        """Create (if needed) and assign the topics: blocking, run in a thread."""
        t = self.topics
        ensure_topics(
            self.bootstrap,
            [t.policy_updates, Topics.dlq(t.policy_updates), t.rollouts, t.interactions, Topics.dlq(t.interactions)],
        )
        self.updates = EventConsumer(
            self.bootstrap, t.policy_updates, events_pb2.PolicyUpdate, f"{self.group_id}-updates-{uuid.uuid4().hex[:8]}"
        )
        if self.use_live or self.sharing:
            self.interactions = EventConsumer(
                self.bootstrap,
                t.interactions,
                events_pb2.Interaction,
                self.group_id,
                on_revoked=self._on_revoked,
                on_reset=lambda reset: self.offsets.forget_all(),  # a new log: offsets start again
                on_assigned=self._on_assigned,
                **self.group.consumer_kwargs(),
            )
            if not self.sharing:
                metrics.LIVE_PARTITIONS.set(len(self.interactions.partitions()))

    def _on_revoked(self, parts: list[tuple[str, int]]) -> None:
        """Polling thread, before `parts` may go to another worker: commit what is done of
        them. (Kafka's eager protocol revokes every partition on every rebalance and assigns
        most of them back: what becomes of each is decided after, in `_after_rebalance`.)"""
        partitions = [p for _, p in parts]
        self._commit(partitions)
        with self._revoked_lock:
            self._revoked.update(partitions)
        self._rebalanced.set()

    def _on_assigned(self, parts: list[tuple[str, int]]) -> None:
        self._rebalanced.set()

    def _commit(self, partitions: list[int] | None = None) -> None:
        """Commit what is done; a commit that cannot finish now (the group rebalancing) is
        left for the next poll, which is what lets this worker rejoin."""
        offsets = self.offsets.to_commit(partitions)
        if not offsets:
            return
        try:
            self.interactions.commit(
                {(self.topics.interactions, p): o for p, o in offsets.items()}, timeout_ms=COMMIT_TIMEOUT_MS
            )
        except KafkaError as e:
            log.info("live-prompt offsets not committed now (%s); next poll retries", type(e).__name__)
            return
        self.offsets.committed(offsets)

    def _after_rebalance(self, loop: RolloutLoop, prompts: PromptMixer) -> None:
        """Event loop: drop the waiting prompts of revoked partitions, take the new share."""
        self._rebalanced.clear()
        with self._revoked_lock:
            revoked, self._revoked = self._revoked, set()
        mine = self.interactions.partitions()
        # the partitions that went elsewhere: their new owner reads them from the commit, so their
        # waiting prompts are dropped here; those that came back stay as they are (already_read
        # skips what the client may hand again)
        lost = revoked - set(mine)
        dropped = prompts.drop_live(lost) if lost else 0
        self.offsets.forget(sorted(lost))
        loop.budget.set_share(mine, max(1, self.interactions.partition_count()), loop.cfg.samples_per_prompt)
        metrics.LIVE_PARTITIONS.set(len(mine))
        metrics.BUDGET_SHARE.set(loop.budget.budget)
        metrics.BUDGET_REMAINING.set(loop.budget.remaining)
        log.info(
            "consumer group rebalanced: partitions of %s now %s",
            self.topics.interactions,
            mine,
            extra={"partitions": mine, "budget_share": loop.budget.budget, "live_prompts_handed_over": dropped},
        )

    def _done(self, item: PromptItem) -> None:
        if item.origin is not None:
            self.offsets.done(*item.origin)

    async def run(self, loop: RolloutLoop, prompts: PromptMixer) -> None:
        loop.on_prompt_done = self._done
        if self.sharing:
            loop.budget.set_share([], 1, loop.cfg.samples_per_prompt)  # nothing until the group assigns partitions
        while not loop.stopping.is_set():
            try:
                await self._poll(loop, prompts)
            except Exception:
                log.exception("polling Kafka failed; retrying")
                await asyncio.sleep(1.0)

    async def _poll(self, loop: RolloutLoop, prompts: PromptMixer) -> None:
        updates = await asyncio.to_thread(self.updates.poll, 200)
        if updates:
            await loop.on_policy_updates([r.event for r in updates])
        if self.interactions is None:
            return
        records = await asyncio.to_thread(self.interactions.poll, 200)
        if self._rebalanced.is_set():
            self._after_rebalance(loop, prompts)  # before this poll's records are buffered
        for r in records:
            if self.offsets.already_read(r.partition, r.offset):
                continue
            if not self.use_live:
                self.offsets.read(r.partition, r.offset, pending=False)
                continue
            messages = [{"role": m.role, "content": m.content} for m in r.event.prompt]
            problem = live_prompt_problem(messages, self.max_prompt_chars)
            if problem is None:
                self.offsets.read(r.partition, r.offset, pending=True)
                for let_go in prompts.add_live(r.event.conversation_id, messages, (r.partition, r.offset)):
                    self._done(let_go)
                continue
            log.warning("live prompt dead-lettered", extra={"event_id": r.event.event_id, "reason": str(problem)})
            await asyncio.to_thread(self.interactions.dead_letter, r, str(problem))
            self.offsets.read(r.partition, r.offset, pending=False)
            metrics.LIVE_PROMPTS_INVALID.labels(problem.reason).inc()
        if records and self.use_live:
            metrics.LIVE_PROMPTS.inc(len(records))
        await asyncio.to_thread(self._commit, self.interactions.partitions())

    def close(self) -> None:
        for c in (self.updates, self.interactions):
            if c is not None:
                c.close()
