"""Which polled rollouts get trained, and the Kafka offsets below which all are handled.

`LearnerState` is what a checkpoint's meta.json holds besides tensors; its `lineage` is how
staleness is counted. `RolloutIntake` buffers polled records in poll order, hands out
batches of the oldest fresh rollouts, and drops two kinds, counted apart:

  invalid  the rollout is broken (batch.invalid_reason: token ids outside the policy's
           vocabulary, non-finite values, lengths that disagree, …) or names a version this
           learner never gave out: dead-lettered to rlhf.rollouts.dlq with the reason
  stale    a real version, but more than max_policy_lag behind the current weights or off
           their lineage (after a revert or rollback): the normal cost of asynchrony, only counted

Either way the record counts as handled, so the next checkpoint's offsets move past it.

With a group objective (grpo, rloo, online_dpo: `group_objective`) a batch is made of whole
groups — the n rollouts of one Generate(n) call, `Rollout.group_id`, whose size the worker
writes into `Rollout.group_size` — taken oldest complete group first. A third kind is then
dropped, counted: `incomplete_group`, the other members of a group that lost one (invalid
or a duplicate event id). A group still waiting for members when it goes stale is
dropped as stale. A batch_size that no number of whole groups fills (not a multiple of
group_size) stops the learner with GroupSizeError before anything is handled.

Groups finish out of poll order (two groups published at once interleave on a partition),
so a taken group may sit above a record still buffered: the checkpoint holds, besides the
lowest unhandled offset per partition, the handled offsets above it (`handled_above`),
and a restarted intake skips those when the consumer reads them again. Exactly once holds
whatever order batches are taken in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rlhf.learner import metrics
from rlhf.learner.batch import RolloutLimits, invalid_reason
from rlhf.validation import Invalid

if TYPE_CHECKING:  # rlhf.bus imports Kafka; the learner package imports it only where it is used
    from rlhf.bus import Offsets

log = logging.getLogger(__name__)

LINEAGE_KEPT = 64  # versions of ancestry remembered; a lag past this is stale anyway
BROKEN_GROUPS_KEPT = 1024  # ids of groups that lost a member, remembered to drop late members

HandledAbove = dict[tuple[str, int], list[int]]  # per (topic, partition): handled offsets ≥ the stored offset


class GroupSizeError(ValueError):
    """batch_size cannot be filled with whole rollout groups: a configuration to fix."""


@dataclass
class LearnerState:
    step: int = 0  # PPO steps done
    version: int = 0  # latest version number given out (0: the initial policy)
    lineage: list[int] = field(default_factory=lambda: [0])  # versions the current weights descend from
    steps_since_version: int = 0  # PPO steps since lineage[-1]
    serving_version: int = 0  # latest promoted or rolled-back-to version
    pending_publish: int | None = None  # a version checkpointed but maybe not yet gated/announced
    offsets: Offsets = field(default_factory=dict)  # next Kafka offset to read, per (topic, partition)
    rollouts_trained: int = 0
    rollouts_dropped_stale: int = 0
    rollouts_invalid: int = 0  # dead-lettered before training (RolloutIntake)
    rollouts_failed: int = 0  # dead-lettered with a PPO step that raised (Learner._train)
    steps_failed: int = 0  # PPO steps that raised or went non-finite, rolled back
    rollouts_dropped_incomplete: int = 0  # members of a rollout group that lost one (group objectives)
    handled_above: HandledAbove = field(default_factory=dict)  # handled records above `offsets` (groups
    # taken out of poll order): skipped on re-read
    # users' Feedback events (user_feedback, rlhf/learner/feedback.py): the same bookkeeping for
    # rlhf.feedback. A checkpoint from before these existed has none: the feedback consumer then
    # starts at the group's committed offsets, else the topic's beginning (docs/learner.md)
    feedback_offsets: Offsets = field(default_factory=dict)
    feedback_handled_above: HandledAbove = field(default_factory=dict)
    feedback_trained: int = 0  # events whose examples joined a step
    feedback_pairs_trained: int = 0  # comparisons trained with the DPO loss
    feedback_answers_trained: int = 0  # thumbs-up or corrected answers trained with the NLL
    feedback_skipped: int = 0  # events the mode trains nothing of (a thumbs-down, ratings under dpo, …)
    feedback_invalid: int = 0  # dead-lettered before training
    feedback_failed: int = 0  # dead-lettered with a step that raised

    def to_json(self) -> dict[str, Any]:
        from rlhf.bus import offsets_to_json

        out = dataclasses.asdict(self)
        for name in ("offsets", "feedback_offsets"):
            out[name] = offsets_to_json(getattr(self, name))
        for name in ("handled_above", "feedback_handled_above"):
            out[name] = [[t, p, sorted(o)] for (t, p), o in sorted(getattr(self, name).items()) if o]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LearnerState:
        from rlhf.bus import offsets_from_json

        known = {f.name for f in dataclasses.fields(cls)}
        positions = ("offsets", "handled_above", "feedback_offsets", "feedback_handled_above")
        state = cls(**{k: v for k, v in data.items() if k in known and k not in positions})
        for name in ("offsets", "feedback_offsets"):
            setattr(state, name, offsets_from_json(data.get(name, [])))
        for name in ("handled_above", "feedback_handled_above"):
            setattr(state, name, {(str(t), int(p)): [int(x) for x in o] for t, p, o in data.get(name, [])})
        return state

    def lag(self, policy_version: int) -> int | None:
        """Versions between a rollout's policy and the current weights; None if not an ancestor."""
        if policy_version not in self.lineage:
            return None
        return len(self.lineage) - 1 - self.lineage.index(policy_version)

    def new_version(self) -> int:
        self.version += 1
        self.lineage = (self.lineage + [self.version])[-LINEAGE_KEPT:]
        self.steps_since_version = 0
        return self.version

    def switch_to(self, version: int) -> None:
        """The weights are now exactly those of a stored version (revert or rollback)."""
        self.lineage = self.lineage[: self.lineage.index(version) + 1] if version in self.lineage else [version]
        self.steps_since_version = 0


DeadLetter = Callable[[Any, str], None]  # (rlhf.bus Record, reason): EventConsumer.dead_letter


class RolloutIntake:
    def __init__(
        self,
        state: LearnerState,
        batch_size: int,
        max_policy_lag: int,
        limits: RolloutLimits | None = None,
        dead_letter: DeadLetter | None = None,
        group_objective: str | None = None,
    ):
        """`limits`: the policy's vocabulary and length (RolloutLimits.of); `dead_letter`
        receives each invalid record with its reason before it counts as handled (its
        failure propagates, and the record is then not skipped); `group_objective`: the
        objective's name when batches must be whole groups (PPOConfig.whole_groups)."""
        self.state = state  # read for lags; its drop counters are updated here
        self.batch_size = batch_size
        self.max_policy_lag = max_policy_lag
        self.limits = limits
        self.dead_letter = dead_letter
        self.group_objective = group_objective
        self._buffer: deque = deque()  # fresh rlhf.bus Records, poll order
        self._handled: Offsets = dict(state.offsets)  # per partition: offset after the last handled
        # per partition: offsets handled at or above the stored offset; those read again are skipped
        self._done: dict[tuple[str, int], set[int]] = {tp: set(o) for tp, o in state.handled_above.items()}
        self._groups: dict[str, dict[str, Any]] = {}  # group_id → {event_id: record}, buffered, oldest first
        self._broken: dict[str, None] = {}  # ids of groups that lost a member (insertion-ordered, capped)
        self.dropped: dict[str, list[str]] = self._no_drops()  # event ids since the last step, per kind

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, records: list) -> None:
        for rec in records:
            key = (rec.topic, rec.partition)
            if rec.offset in self._done.get(key, ()):  # handled before the restart: not again
                self._mark_handled(rec)
                continue
            reason = (
                invalid_reason(rec.event, self.limits)
                or self._unknown_version(rec.event.policy_version)
                or self._group_reason(rec)
            )
            if reason is not None:
                log.warning(
                    "invalid rollout dead-lettered",
                    extra={"event_id": rec.event.event_id, "offset": rec.offset, "reason": str(reason)},
                )
                if self.dead_letter is not None:
                    self.dead_letter(rec, str(reason))
                self._drop(rec, "invalid", reason.reason)
                if self.group_objective and rec.event.group_id:
                    self._break_group(rec.event.group_id)
            elif self.group_objective and rec.event.group_id in self._broken:
                self._drop(rec, "incomplete_group")
            elif self._is_stale(rec):
                self._drop(rec, "dropped_stale")
            else:
                self._buffer.append(rec)
                if self.group_objective:
                    self._groups.setdefault(rec.event.group_id, {})[rec.event.event_id] = rec

    def take_batch(self) -> list | None:
        """The oldest batch_size buffered rollouts still fresh (with a group objective: the
        oldest complete groups, batch_size rollouts in all), or None while too few."""
        if self.group_objective:
            return self._take_groups()
        while self._buffer and self._is_stale(self._buffer[0]):  # went stale while waiting
            self._drop(self._buffer.popleft(), "dropped_stale")
        if len(self._buffer) < self.batch_size:
            return None
        taken = []
        while len(taken) < self.batch_size and self._buffer:
            rec = self._buffer.popleft()
            if self._is_stale(rec):
                self._drop(rec, "dropped_stale")
            else:
                taken.append(rec)
        if len(taken) < self.batch_size:  # some went stale: wait for more
            self._buffer.extendleft(reversed(taken))
            return None
        for rec in taken:
            self._mark_handled(rec)
        return taken

    def _take_groups(self) -> list | None:
        for rec in [r for r in self._buffer if self._is_stale(r)]:  # went stale while waiting
            self._remove(rec)
            self._drop(rec, "dropped_stale")
        taken: list = []
        for members in self._groups.values():
            size = next(iter(members.values())).event.group_size
            if len(members) == size and len(taken) + size <= self.batch_size:
                taken += members.values()
                if len(taken) == self.batch_size:
                    break
        if len(taken) < self.batch_size:
            return None
        for rec in taken:
            self._remove(rec)
            self._mark_handled(rec)
        return taken

    def safe_offsets(self) -> Offsets:
        """Per partition, the offset below which every record is handled: a restart that
        seeks here re-reads only what no checkpointed step has seen (and, with
        handled_above, skips what was handled above it)."""
        safe = dict(self._handled)
        for rec in self._buffer:
            key = (rec.topic, rec.partition)
            safe[key] = min(safe.get(key, rec.offset), rec.offset)
        return safe

    def handled_above(self) -> HandledAbove:
        """Per partition, the handled offsets at or above safe_offsets(): what a checkpoint
        holds beside those offsets (non-empty only when batches were taken out of poll order)."""
        safe = self.safe_offsets()
        out: HandledAbove = {}
        for key, done in self._done.items():
            done.difference_update([o for o in done if o < safe.get(key, 0)])  # below the offset: covered
            if done:
                out[key] = sorted(done)
        return out

    def forget_log(self, topic: str) -> None:
        """`topic`'s log was lost (rlhf.bus.LogReset): drop its buffered records and handled
        offsets, which point into the old log; the consumer reads the new one from its start."""
        for rec in [r for r in self._buffer if r.topic == topic]:
            self._remove(rec)
        self._handled = {tp: o for tp, o in self._handled.items() if tp[0] != topic}
        self._done = {tp: o for tp, o in self._done.items() if tp[0] != topic}
        self.state.handled_above = {tp: o for tp, o in self.state.handled_above.items() if tp[0] != topic}

    def record_failed(self, records: list) -> None:
        """A taken batch whose PPO step raised (already dead-lettered): counted, in the next ledger line."""
        self.dropped["failed"] += [rec.event.event_id for rec in records]
        self.state.rollouts_failed += len(records)
        self.state.steps_failed += 1

    def pop_dropped(self) -> dict[str, list[str]]:
        dropped, self.dropped = self.dropped, self._no_drops()
        return dropped

    def _no_drops(self) -> dict[str, list[str]]:
        kinds = {"dropped_stale": [], "invalid": [], "failed": []}
        if self.group_objective:
            kinds["incomplete_group"] = []
        return kinds

    def _group_reason(self, rec) -> Invalid | None:
        """Why a rollout cannot join a whole group (group objectives only), or None. A
        group size that batch_size is not a multiple of raises GroupSizeError: no rollout
        of such a group could ever be trained, and the fix is the learner's setting."""
        if not self.group_objective:
            return None
        ev = rec.event
        if not ev.group_id or ev.group_size < 1:
            return Invalid(
                "group",
                f"objective {self.group_objective} trains on whole rollout groups: group_id "
                f"{ev.group_id!r} and group_size {ev.group_size} must be set (the rollout "
                f"worker sets both)",
            )
        if self.batch_size % ev.group_size:
            raise GroupSizeError(
                f"learner batch_size {self.batch_size} is not a multiple of the rollout group size "
                f"{ev.group_size} (the rollout worker's rollout_samples_per_prompt, Rollout.group_size); objective "
                f"{self.group_objective} trains on whole groups: set RLHF_LEARNER_BATCH_SIZE to a multiple of "
                f"{ev.group_size}, e.g. {max(1, self.batch_size // ev.group_size) * ev.group_size}"
            )
        members = self._groups.get(ev.group_id, {})
        if ev.event_id in members:
            return Invalid("duplicate", f"event_id {ev.event_id} is already in group {ev.group_id}")
        if members and len(members) >= next(iter(members.values())).event.group_size:
            return Invalid("group", f"group {ev.group_id} already has its group_size {ev.group_size} rollouts")
        return None

    def _break_group(self, group_id: str) -> None:
        """A member of group_id is gone: its buffered members, and later ones, are dropped."""
        self._broken[group_id] = None
        while len(self._broken) > BROKEN_GROUPS_KEPT:
            del self._broken[next(iter(self._broken))]
        for rec in list(self._groups.get(group_id, {}).values()):
            self._remove(rec)
            self._drop(rec, "incomplete_group")

    def _remove(self, rec) -> None:
        """Take a buffered record out of the buffer (and its group)."""
        self._buffer.remove(rec)
        if self.group_objective:
            members = self._groups.get(rec.event.group_id)
            if members is not None:
                members.pop(rec.event.event_id, None)
                if not members:
                    del self._groups[rec.event.group_id]

    def _unknown_version(self, version: int) -> Invalid | None:
        # Newer than anything this learner numbered: not late but forged or from another
        # learner's history. (An old version off the lineage is merely stale.)
        if 0 <= version <= self.state.version:
            return None
        return Invalid(
            "version", f"policy_version {version} was never given out by this learner (latest {self.state.version})"
        )

    def _is_stale(self, rec) -> bool:
        lag = self.state.lag(rec.event.policy_version)
        return lag is None or lag > self.max_policy_lag

    def _drop(self, rec, kind: str, reason: str = "") -> None:
        self.dropped[kind].append(rec.event.event_id)
        self._mark_handled(rec)
        if kind == "invalid":
            self.state.rollouts_invalid += 1
            metrics.ROLLOUTS_INVALID.labels(reason).inc()
        elif kind == "incomplete_group":
            self.state.rollouts_dropped_incomplete += 1
            metrics.ROLLOUTS_DROPPED_INCOMPLETE.inc()
        else:
            self.state.rollouts_dropped_stale += 1
            metrics.ROLLOUTS_DROPPED_STALE.inc()

    def _mark_handled(self, rec) -> None:
        key = (rec.topic, rec.partition)
        self._handled[key] = max(self._handled.get(key, 0), rec.offset + 1)
        self._done.setdefault(key, set()).add(rec.offset)
