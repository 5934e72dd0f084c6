"""The promotion controller's state, and the sticky traffic split the gateway will use.

`CanaryController` follows one stable version and at most one candidate in canary. It reads
feedback as plain `FeedbackRecord`s (the service hosting it turns `Feedback` events into
them), feeds the ones about the two versions to the decision rule (rlhf/canary/decision.py)
and, when the rule decides, promotes the candidate (it becomes stable) or rolls it back
(stable stays), records the outcome and starts afresh: the next canary's evidence is new, so
data from one canary never decides another. A candidate arriving while one is pending
follows `new_candidate` (replace / queue / reject) and the answer says which, always.

No I/O, no clock: time is what the records' timestamps and `tick(now)` say, so a service
replaying the feedback topic reaches the same decisions.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import numpy as np

from rlhf.canary.config import CanaryConfig
from rlhf.canary.decision import CanaryEvidence, Decision, MixturePrior, Verdict, decide
from rlhf.errors import InvalidArgument

THUMBS, COMPARISON = "thumbs", "comparison"


@dataclass(frozen=True)
class FeedbackRecord:
    """One rating, as the controller needs it (from a `Feedback` event: Rating or Comparison)."""

    kind: Literal["thumbs", "comparison"]
    versions: tuple[int, ...]  # thumbs: (rated,); comparison: (chosen, rejected), for a tie the two shown
    value: int  # thumbs: +1 up, −1 down; comparison: +1 the first was chosen, 0 a tie
    timestamp_seconds: float  # when it was given (Feedback.created_unix_ms / 1000)

    def __post_init__(self) -> None:
        if self.kind not in (THUMBS, COMPARISON):
            raise InvalidArgument(f"kind: {self.kind!r} is neither 'thumbs' nor 'comparison'")
        want = 1 if self.kind == THUMBS else 2
        if len(self.versions) != want:
            raise InvalidArgument(f"versions: {self.kind} names {want} version(s), got {len(self.versions)}")
        allowed = (1, -1) if self.kind == THUMBS else (1, 0)
        if self.value not in allowed:
            raise InvalidArgument(f"value: {self.value} for {self.kind}, expected one of {allowed}")
        if not math.isfinite(self.timestamp_seconds):
            raise InvalidArgument(f"timestamp_seconds: {self.timestamp_seconds} is not a finite number")


class Admission(str, Enum):
    STARTED = "started"  # no canary was running: it runs now
    REPLACED = "replaced"  # new_candidate=replace: the pending one ended, this one runs now
    QUEUED = "queued"  # new_candidate=queue: it runs when the pending one is decided
    REJECTED = "rejected"  # new_candidate=reject, or the queue is full


@dataclass(frozen=True)
class Proposal:
    action: Admission
    candidate: int
    reason: str  # for the log line / PolicyUpdate.reason
    displaced: int | None = None  # REPLACED: the candidate that was pending


@dataclass(frozen=True)
class CanaryOutcome:
    """A finished canary."""

    candidate: int
    stable_before: int
    stable_after: int
    verdict: Verdict  # PROMOTE or ROLL_BACK (a replaced candidate is rolled back, reason "replaced")
    reason: str
    started_seconds: float
    ended_seconds: float
    evidence: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """What one record (or tick) did to the canary."""

    decision: Decision  # the rule on the evidence so far; PROMOTE / ROLL_BACK ended the canary
    alert_raised: bool = False  # the thumbs-down alert fired with this record (once per canary)
    next_candidate: int | None = None  # a queued candidate that started because this canary ended


@dataclass
class _Canary:
    candidate: int
    started_seconds: float
    evidence: CanaryEvidence
    latest_seconds: float
    alerted: bool = False


@dataclass
class CanaryController:
    stable: int
    config: CanaryConfig = field(default_factory=CanaryConfig)
    history: list[CanaryOutcome] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # records not about the canary, by why

    def __post_init__(self) -> None:
        self._prior = MixturePrior.from_config(self.config)
        self._canary: _Canary | None = None
        self._queue: deque[int] = deque()

    # --- state ----------------------------------------------------------------------------
    @property
    def candidate(self) -> int | None:
        return self._canary.candidate if self._canary else None

    @property
    def queued(self) -> tuple[int, ...]:
        return tuple(self._queue)

    def decision(self, now_seconds: float | None = None) -> Decision | None:
        """The rule's current view of the running canary (None: no canary), for status and metrics."""
        if self._canary is None:
            return None
        return self._decide(self._canary, self._elapsed(self._canary, now_seconds))

    def snapshot(self, now_seconds: float | None = None) -> dict[str, Any]:
        """JSON-ready state: versions, queue, the running canary's evidence, how many were decided."""
        current = self.decision(now_seconds)
        return {
            "stable": self.stable,
            "candidate": self.candidate,
            "queued": list(self._queue),
            "new_candidate": self.config.new_candidate,
            "evidence": current.evidence if current else None,
            "decided": len(self.history),
            "ignored": dict(self.ignored),
        }

    # --- candidates -----------------------------------------------------------------------
    def propose(self, candidate: int, now_seconds: float) -> Proposal:
        """A version that passed the drift gate asks to be canaried."""
        if candidate == self.stable:
            raise InvalidArgument(f"candidate: version {candidate} is the stable version")
        if candidate == self.candidate or candidate in self._queue:
            raise InvalidArgument(f"candidate: version {candidate} is already pending")
        if self._canary is None:
            self._start(candidate, now_seconds)
            return Proposal(Admission.STARTED, candidate, f"canary of version {candidate} started")
        pending = self._canary.candidate
        policy = self.config.new_candidate
        if policy == "replace":
            self._finish(Verdict.ROLL_BACK, f"replaced by version {candidate}", now_seconds)
            self._start(candidate, now_seconds)
            reason = f"version {candidate} replaces pending candidate {pending} (new_candidate=replace)"
            return Proposal(Admission.REPLACED, candidate, reason, displaced=pending)
        if policy == "queue":
            if len(self._queue) >= self.config.queue_limit:
                reason = (
                    f"version {candidate} rejected: {len(self._queue)} candidates queued behind {pending}, "
                    f"queue_limit={self.config.queue_limit}"
                )
                return Proposal(Admission.REJECTED, candidate, reason)
            self._queue.append(candidate)
            reason = f"version {candidate} queued behind pending candidate {pending} (new_candidate=queue)"
            return Proposal(Admission.QUEUED, candidate, reason)
        return Proposal(
            Admission.REJECTED,
            candidate,
            f"version {candidate} rejected: candidate {pending} is pending (new_candidate=reject)",
        )

    # --- feedback -------------------------------------------------------------------------
    def observe(self, record: FeedbackRecord) -> Step | None:
        """Feed one record; None when it says nothing about the running canary (counted in `ignored`)."""
        canary = self._canary
        if canary is None:
            return self._ignore("no_canary")
        if record.timestamp_seconds < canary.started_seconds:
            return self._ignore("before_canary")
        pair = (self.stable, canary.candidate)
        ev = canary.evidence
        if record.kind == THUMBS:
            (version,) = record.versions
            if version not in pair:
                return self._ignore("other_version")
            ev.add_thumbs(np.array([version == canary.candidate]), np.array([record.value == 1]))
        else:
            first, second = record.versions
            if {first, second} != set(pair):
                return self._ignore("other_pair")
            ev.add_comparisons(np.array([first == canary.candidate]), np.array([record.value == 0]))
        canary.latest_seconds = max(canary.latest_seconds, record.timestamp_seconds)
        return self._step(canary, canary.latest_seconds)

    def tick(self, now_seconds: float) -> Step | None:
        """Let time pass without feedback: the duration limit can end a quiet canary."""
        if self._canary is None:
            return None
        return self._step(self._canary, max(now_seconds, self._canary.latest_seconds))

    # --- internals ------------------------------------------------------------------------
    def _ignore(self, why: str) -> None:
        self.ignored[why] = self.ignored.get(why, 0) + 1
        return None

    def _elapsed(self, canary: _Canary, now_seconds: float | None) -> float:
        now = canary.latest_seconds if now_seconds is None else max(now_seconds, canary.latest_seconds)
        return now - canary.started_seconds

    def _decide(self, canary: _Canary, elapsed_seconds: float) -> Decision:
        d = decide(canary.evidence, self.config, elapsed_seconds)
        d.evidence.update(stable=self.stable, candidate=canary.candidate, started_seconds=canary.started_seconds)
        return d

    def _step(self, canary: _Canary, now_seconds: float) -> Step:
        d = self._decide(canary, now_seconds - canary.started_seconds)
        raised = d.alert and not canary.alerted
        canary.alerted = canary.alerted or d.alert
        if d.verdict is Verdict.CONTINUE:
            return Step(d, alert_raised=raised)
        self._finish(d.verdict, d.reason, now_seconds, d.evidence)
        nxt = None
        if self._queue:
            nxt = self._queue.popleft()
            self._start(nxt, now_seconds)
        return Step(d, alert_raised=raised, next_candidate=nxt)

    def _start(self, candidate: int, now_seconds: float) -> None:
        self._canary = _Canary(candidate, now_seconds, CanaryEvidence(self._prior), latest_seconds=now_seconds)

    def _finish(
        self, verdict: Verdict, reason: str, now_seconds: float, evidence: dict[str, Any] | None = None
    ) -> None:
        canary = self._canary
        assert canary is not None
        if evidence is None:
            evidence = self._decide(canary, self._elapsed(canary, now_seconds)).evidence
        before = self.stable
        if verdict is Verdict.PROMOTE:
            self.stable = canary.candidate
        self.history.append(
            CanaryOutcome(
                candidate=canary.candidate,
                stable_before=before,
                stable_after=self.stable,
                verdict=verdict,
                reason=reason,
                started_seconds=canary.started_seconds,
                ended_seconds=max(now_seconds, canary.latest_seconds),
                evidence=evidence,
            )
        )
        self._canary = None


# --- the traffic split -------------------------------------------------------------------
def bucket(conversation_id: str, candidate: int) -> float:
    """The conversation's fixed point in [0, 1) for this candidate: SHA-256, not Python's
    `hash` (salted per process), so every gateway replica and restart agrees."""
    digest = hashlib.sha256(f"{candidate}\x00{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(conversation_id: str, share: float, *, stable: int, candidate: int | None) -> int:
    """The version that serves this conversation: the candidate when its bucket is below `share`.

    Sticky: the same id always gets the same version for a given candidate. Monotone: raising
    the share only moves conversations from stable to the candidate (a bucket below the old
    share is below the new one). The candidate salts the hash, so successive candidates are
    tried on different conversations, not on the same few users every time."""
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidArgument("conversation_id: must be a non-empty string")
    if not (0.0 <= share <= 1.0):
        raise InvalidArgument(f"share: {share} is outside [0, 1]")
    if candidate is None or share == 0.0:
        return stable
    return candidate if bucket(conversation_id, candidate) < share else stable
