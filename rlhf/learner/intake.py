"""Which polled rollouts get trained, and the Kafka offsets below which all are handled.

`LearnerState` is what a checkpoint's meta.json holds besides tensors; its `lineage` is how
staleness is counted. `RolloutIntake` buffers polled records in poll order, drops
malformed ones and ones more than max_policy_lag versions behind the current weights, and
hands out batches of the oldest fresh rollouts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rlhf.learner import metrics
from rlhf.learner.batch import invalid_reason
from rlhf.learner.checkpoint import Offsets, offsets_from_json, offsets_to_json

log = logging.getLogger(__name__)

LINEAGE_KEPT = 64  # versions of ancestry remembered; a lag past this is stale anyway


@dataclass
class LearnerState:
    step: int = 0                      # PPO steps done
    version: int = 0                   # latest version number given out (0: the initial policy)
    lineage: list[int] = field(default_factory=lambda: [0])  # versions the current weights descend from
    steps_since_version: int = 0       # PPO steps since lineage[-1]
    serving_version: int = 0           # latest promoted or rolled-back-to version
    pending_publish: int | None = None  # a version checkpointed but maybe not yet gated/announced
    offsets: Offsets = field(default_factory=dict)  # next Kafka offset to read, per (topic, partition)
    rollouts_trained: int = 0
    rollouts_dropped_stale: int = 0
    rollouts_invalid: int = 0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["offsets"] = offsets_to_json(self.offsets)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LearnerState:
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known and k != "offsets"})
        state.offsets = offsets_from_json(data.get("offsets", []))
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


class RolloutIntake:
    def __init__(self, state: LearnerState, batch_size: int, max_policy_lag: int):
        self.state = state  # read for lags; its drop counters are updated here
        self.batch_size = batch_size
        self.max_policy_lag = max_policy_lag
        self._buffer: deque = deque()  # fresh rlhf.bus Records, poll order
        self._handled: Offsets = dict(state.offsets)  # per partition: offset after the last handled
        self.dropped: dict[str, list[str]] = {"dropped_stale": [], "invalid": []}  # since the last step

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, records: list) -> None:
        for rec in records:
            reason = invalid_reason(rec.event)
            if reason is not None:
                log.warning("invalid rollout dropped", extra={"event_id": rec.event.event_id, "reason": reason})
                self._drop(rec, "invalid")
            elif self._is_stale(rec):
                self._drop(rec, "dropped_stale")
            else:
                self._buffer.append(rec)

    def take_batch(self) -> list | None:
        """The oldest batch_size buffered rollouts still fresh, or None while too few."""
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

    def safe_offsets(self) -> Offsets:
        """Per partition, the offset below which every record is handled: a restart that
        seeks here re-reads only what no checkpointed step has seen."""
        safe = dict(self._handled)
        for rec in self._buffer:
            key = (rec.topic, rec.partition)
            safe[key] = min(safe.get(key, rec.offset), rec.offset)
        return safe

    def pop_dropped(self) -> dict[str, list[str]]:
        dropped, self.dropped = self.dropped, {"dropped_stale": [], "invalid": []}
        return dropped

    def _is_stale(self, rec) -> bool:
        lag = self.state.lag(rec.event.policy_version)
        return lag is None or lag > self.max_policy_lag

    def _drop(self, rec, kind: str) -> None:
        self.dropped[kind].append(rec.event.event_id)
        self._mark_handled(rec)
        if kind == "invalid":
            self.state.rollouts_invalid += 1
            metrics.ROLLOUTS_INVALID.inc()
        else:
            self.state.rollouts_dropped_stale += 1
            metrics.ROLLOUTS_DROPPED_STALE.inc()

    def _mark_handled(self, rec) -> None:
        key = (rec.topic, rec.partition)
        self._handled[key] = max(self._handled.get(key, 0), rec.offset + 1)
