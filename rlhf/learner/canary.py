"""The learner's promotion controller (issue 15): users' feedback decides whether a version
that passed the drift gate replaces the stable one.

Why in the learner and not a service of its own: the learner already owns the versions,
the drift gate, the weight store and the one publisher of rlhf.policy-updates, and its
checkpoint is where exactly-once state lives. A separate controller would need its own
copy of all four, and a second writer of rlhf.policy-updates would race the learner's own
announcements (docs/canary.md, "The controller in the learner").

`CanaryPlane` hosts `rlhf.canary.CanaryController` (the rule and its state: pure, no clock)
and adds what a service needs around it:

- `feedback_record`: a `Feedback` event as the controller's `FeedbackRecord` (Rating →
  thumbs on `policy_version`; Comparison → chosen over rejected, a tie or both-bad as
  value 0), or the
  bounded reason it has none, counted (rlhf_learner_canary_feedback_total{outcome});
- the feedback topic's offsets it has read, and the running canary's inputs (its start and
  the records it used), so `to_json` / `from_json` put the exact state in the learner's
  checkpoint: restored, the controller replays those inputs and the consumer seeks past
  them, so replaying rlhf.feedback from the checkpoint reaches the same decisions (time is
  the records' timestamps; `tick` only ends a canary past max_duration_seconds);
- operator actions (Promote, Rollback, SetCanary) and the share and on/off switch;
- every change of what is served as a `Change` for the learner to announce (a PolicyUpdate
  stating the whole serving state), log and count; the metrics of the running canary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from rlhf.canary import CanaryConfig, CanaryController, FeedbackRecord, Verdict
from rlhf.canary.controller import COMPARISON, THUMBS, Admission, CanaryOutcome, Proposal, Step
from rlhf.errors import FailedPrecondition, InvalidArgument
from rlhf.learner import metrics

log = logging.getLogger(__name__)

ROLES = ("stable", "candidate")
HISTORY_KEPT = 20  # finished canaries kept in the checkpoint and GetCanary's last_decision
WILSON_Z = 1.959964  # 95 % two-sided


class LearnerCanaryConfig(CanaryConfig):
    """The decision rule's settings and the learner's own: on/off, the share, the clock."""

    enabled: bool = Field(
        False,
        description="canary promotion: a version that passes the drift gate is served to `share` of new "
        "conversations beside the stable one, and users' feedback on the two decides promote / roll back "
        "(docs/canary.md); off: it is promoted at once, as before",
    )
    share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="share of new conversations the candidate gets while its canary runs (the gateway's sticky "
        "split by conversation id); SetCanary / `rlhf canary --share` change it at run time",
    )
    tick_seconds: float = Field(
        1.0, gt=0.0, description="how often the canary's duration limit is checked while no feedback arrives"
    )


def _is_tie(comparison: Any) -> bool:
    """A comparison the person judged a tie, or both answers bad (`Comparison.outcome`, once
    the gateway sends it): neither version won, so value 0 for the head-to-head."""
    field_ = comparison.DESCRIPTOR.fields_by_name.get("outcome")
    if field_ is None or field_.enum_type is None:
        return False
    value = field_.enum_type.values_by_number.get(comparison.outcome)
    return value is not None and value.name.endswith(("_TIE", "_BOTH_BAD"))


def feedback_record(event: Any) -> FeedbackRecord | str:
    """The controller's record of a `Feedback` event, or the (bounded) reason there is none."""
    t = event.created_unix_ms / 1000.0
    kind = event.WhichOneof("kind")
    if kind == "rating":
        r = event.rating
        if r.value not in (1, -1):
            return "bad_value"
        return FeedbackRecord(THUMBS, (int(r.policy_version),), int(r.value), t)
    if kind == "comparison":
        c = event.comparison
        if c.chosen_policy_version == c.rejected_policy_version:
            return "same_version"  # two answers of one version say nothing about which version is better
        versions = (int(c.chosen_policy_version), int(c.rejected_policy_version))
        return FeedbackRecord(COMPARISON, versions, 0 if _is_tie(c) else 1, t)
    return "no_kind"


@dataclass(frozen=True)
class Change:
    """A change of what is served, for the learner to announce as one PolicyUpdate."""

    kind: Literal["canary", "promoted", "rolled_back", "queued", "rejected"]
    version: int  # the event's version: the candidate (canary, promoted, queued, rejected) or the stable
    stable: int  # the serving state after it
    candidate: int  # 0: none running
    reason: str
    decision: dict[str, Any] | None = None  # a decision's evidence (promoted / rolled_back)


def wilson(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson's score interval for a binomial rate (Wilson 1927, "Probable inference, the law of
    succession, and statistical inference"): sensible at 0 and n, unlike the normal one.
    (NaN, NaN) for n = 0. For the dashboard only; the decision is the sequential test's."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def _record_json(r: FeedbackRecord) -> list:
    return [r.kind, list(r.versions), r.value, r.timestamp_seconds]


def _record_from(data: list) -> FeedbackRecord:
    kind, versions, value, t = data
    return FeedbackRecord(kind, tuple(int(v) for v in versions), int(value), float(t))


def _outcome_json(o: CanaryOutcome, by: str) -> dict[str, Any]:
    return {
        "candidate": o.candidate,
        "stable_before": o.stable_before,
        "stable_after": o.stable_after,
        "verdict": o.verdict.value,
        "reason": o.reason,
        "by": by,
        "started_seconds": o.started_seconds,
        "ended_seconds": o.ended_seconds,
        "evidence": o.evidence,
    }


@dataclass
class CanaryPlane:
    """The canary state one learner keeps (see the module docstring)."""

    config: LearnerCanaryConfig
    stable: int
    enabled: bool = False
    share: float = 0.1
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next feedback offset per partition
    history: list[dict[str, Any]] = field(default_factory=list)  # finished canaries, newest last

    def __post_init__(self) -> None:
        self.controller = CanaryController(self.stable, self.config)
        self._started: float | None = None  # the running canary's start (records' clock)
        self._records: list[FeedbackRecord] = []  # what the running canary used, in order

    @classmethod
    def new(cls, config: LearnerCanaryConfig, stable: int) -> CanaryPlane:
        return cls(config, stable, enabled=config.enabled, share=config.share)

    # --- state ----------------------------------------------------------------------------
    @property
    def candidate(self) -> int:
        return self.controller.candidate or 0

    @property
    def queued(self) -> tuple[int, ...]:
        return self.controller.queued

    def serving(self) -> dict[str, Any]:
        """The PolicyUpdate fields that state what is served."""
        return {"stable_version": self.stable, "candidate_version": self.candidate, "canary_share": self.share}

    def evidence(self, now_seconds: float | None = None) -> dict[str, Any] | None:
        d = self.controller.decision(now_seconds)
        return d.evidence if d is not None else None

    def status(self, now_seconds: float | None = None) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "stable_version": self.stable,
            "candidate_version": self.candidate,
            "share": self.share,
            "queued": list(self.queued),
            "evidence": self.evidence(now_seconds),
            "last_decision": self.history[-1] if self.history else None,
            "ignored": dict(self.controller.ignored),
        }

    # --- inputs ---------------------------------------------------------------------------
    def propose(self, version: int, now_seconds: float) -> Change:
        """A version passed the drift gate (canaries on): start, queue, replace or refuse it."""
        if not self.enabled:
            raise FailedPrecondition("canaries are off (SetCanary enabled=true turns them on)")
        if version == self.candidate or version in self.queued:  # a publication finished again after a crash
            kind = "canary" if version == self.candidate else "queued"
            return Change(kind, version, self.stable, self.candidate, f"version {version} is already pending")
        displaced = self.candidate
        p: Proposal = self.controller.propose(version, now_seconds)
        if p.action is Admission.REPLACED:
            self._ended(self.controller.history[-1], by="replaced")
        if p.action in (Admission.STARTED, Admission.REPLACED):
            self._started, self._records = now_seconds, []
            log.info("canary started", extra={"candidate": version, "stable": self.stable, "share": self.share})
            if displaced and p.action is Admission.REPLACED:
                log.warning("canary replaced", extra={"candidate": version, "displaced": displaced})
            return Change("canary", version, self.stable, version, p.reason)
        kind = "queued" if p.action is Admission.QUEUED else "rejected"
        log.info(f"canary candidate {kind}", extra={"candidate": version, "reason": p.reason})
        return Change(kind, version, self.stable, self.candidate, p.reason)

    def observe(self, records: list) -> list[Change]:
        """Polled rlhf.feedback records (rlhf.bus Records), in poll order."""
        changes: list[Change] = []
        for rec in records:
            key = (rec.topic, rec.partition)
            if rec.offset < self.offsets.get(key, 0):  # read before (a seek that went back)
                continue
            self.offsets[key] = rec.offset + 1
            got = feedback_record(rec.event)
            if isinstance(got, str):
                metrics.CANARY_FEEDBACK.labels(got).inc()
                continue
            changes += self._observe(got)
        return changes

    def _observe(self, record: FeedbackRecord) -> list[Change]:
        before = dict(self.controller.ignored)
        step = self.controller.observe(record)
        if step is None:
            why = next((k for k, n in self.controller.ignored.items() if n != before.get(k, 0)), "ignored")
            metrics.CANARY_FEEDBACK.labels(why).inc()
            return []
        metrics.CANARY_FEEDBACK.labels("observed").inc()
        self._records.append(record)
        return self._after(step)

    def tick(self, now_seconds: float) -> list[Change]:
        """The wall clock: lets max_duration_seconds end a canary no feedback reaches."""
        return self._after(self.controller.tick(now_seconds))

    def _after(self, step: Step | None) -> list[Change]:
        if step is None:
            return []
        if step.alert_raised:
            log.warning(
                "canary thumbs-down alert: the candidate is rated significantly worse than stable",
                extra={"candidate": self.candidate, "stable": self.stable, "evidence": step.decision.evidence},
            )
        if step.decision.verdict is Verdict.CONTINUE:
            return []
        outcome = self.controller.history[-1]
        changes = [self._decided(outcome, by="rule")]
        if step.next_candidate is not None:
            changes.append(self._next_started(step.next_candidate, outcome.ended_seconds))
        return changes

    # --- operator actions -----------------------------------------------------------------
    def promote(self, version: int, now_seconds: float) -> list[Change]:
        """Make `version` stable now (the learner has checked it passed the drift gate): the
        running candidate, a queued one or any other; a running canary ends (by operator)."""
        if version == self.stable:
            raise FailedPrecondition(f"version {version} is already the stable version")
        queued = [q for q in self.queued if q != version]
        decision = self._operator_end(Verdict.PROMOTE, version, now_seconds, "operator promote")
        changes = [Change("promoted", version, version, 0, f"operator promoted version {version}", decision)]
        changes += self._requeue(queued, now_seconds)
        return changes

    def rolled_back(self, version: int, now_seconds: float) -> Change:
        """An operator rollback to `version` (Learner.rollback): it is stable, the running
        canary ends rolled back, queued candidates are dropped (they descend from what the
        operator turned away from)."""
        decision = self._operator_end(Verdict.ROLL_BACK, version, now_seconds, "operator rollback")
        return Change("rolled_back", version, version, 0, f"operator rolled back to version {version}", decision)

    def follow(self, stable: int) -> None:
        """Canaries off: a version promoted (or rolled back to) the old way is the stable one."""
        if self.candidate:
            raise FailedPrecondition(f"candidate {self.candidate} is running; promote or roll it back first")
        self._reset(stable)

    def set_share(self, share: float) -> Change | None:
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise InvalidArgument(f"share: {share} is outside [0, 1]")
        self.share = float(share)
        if self.candidate:
            reason = f"canary share of version {self.candidate} set to {share:g}"
            return Change("canary", self.candidate, self.stable, self.candidate, reason)
        return None

    def set_enabled(self, enabled: bool, stable: int) -> None:
        if not enabled and self.candidate:
            raise FailedPrecondition(
                f"candidate {self.candidate} is in canary: promote or roll it back before turning canaries off"
            )
        if enabled and not self.enabled:
            self._reset(stable)
        self.enabled = bool(enabled)

    # --- internals ------------------------------------------------------------------------
    def _decided(self, outcome: CanaryOutcome, by: str) -> Change:
        record = self._ended(outcome, by)
        self.stable = outcome.stable_after
        verb = "promoted" if outcome.verdict is Verdict.PROMOTE else "rolled back"
        reason = f"canary: version {outcome.candidate} {verb} ({outcome.reason}; stable was {outcome.stable_before})"
        log.warning(
            f"canary {verb}",
            extra={"candidate": outcome.candidate, "stable": self.stable, "by": by, "evidence": outcome.evidence},
        )
        if outcome.verdict is Verdict.PROMOTE:
            return Change("promoted", outcome.candidate, self.stable, 0, reason, record)
        return Change("rolled_back", self.stable, self.stable, 0, reason, record)

    def _ended(self, outcome: CanaryOutcome, by: str) -> dict[str, Any]:
        record = _outcome_json(outcome, by)
        self.history = (self.history + [record])[-HISTORY_KEPT:]
        self._started, self._records = None, []
        metrics.CANARY_DECISIONS.labels(outcome.verdict.value, by).inc()
        return record

    def _next_started(self, candidate: int, at: float) -> Change:
        self._started, self._records = at, []
        log.info("canary started (queued)", extra={"candidate": candidate, "stable": self.stable})
        return Change("canary", candidate, self.stable, candidate, f"queued version {candidate} starts its canary")

    def _operator_end(self, verdict: Verdict, stable_after: int, now_seconds: float, reason: str) -> dict[str, Any]:
        """End the running canary (if any) by an operator's word; the controller starts afresh."""
        running = self.candidate
        if running:
            evidence = self.evidence(now_seconds) or {}
            # the operator's verdict on the candidate: promoting another version rolls it back
            ended = verdict if stable_after == running else Verdict.ROLL_BACK
            outcome = CanaryOutcome(
                candidate=running,
                stable_before=self.stable,
                stable_after=stable_after,
                verdict=ended,
                reason=reason,
                started_seconds=self._started or now_seconds,
                ended_seconds=now_seconds,
                evidence=evidence,
            )
            record = self._ended(outcome, by="operator")
        else:
            record = {
                "candidate": 0,
                "stable_before": self.stable,
                "stable_after": stable_after,
                "verdict": verdict.value,
                "reason": reason,
                "by": "operator",
                "ended_seconds": now_seconds,
                "evidence": None,
            }
            self.history = (self.history + [record])[-HISTORY_KEPT:]
            metrics.CANARY_DECISIONS.labels(verdict.value, "operator").inc()
        self._reset(stable_after)
        return record

    def _requeue(self, queued: list[int], now_seconds: float) -> list[Change]:
        return [self.propose(q, now_seconds) for q in queued if q != self.stable]

    def _reset(self, stable: int) -> None:
        self.stable = stable
        ignored = dict(self.controller.ignored)
        self.controller = CanaryController(stable, self.config)
        self.controller.ignored.update(ignored)
        self._started, self._records = None, []

    # --- checkpoint -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        from rlhf.bus import offsets_to_json

        return {
            "stable": self.stable,
            "enabled": self.enabled,
            "share": self.share,
            "candidate": self.candidate,
            "started_seconds": self._started,
            "records": [_record_json(r) for r in self._records],
            "queued": list(self.queued),
            "offsets": offsets_to_json(self.offsets),
            "history": self.history,
            "ignored": dict(self.controller.ignored),
        }

    @classmethod
    def from_json(cls, config: LearnerCanaryConfig, data: dict[str, Any]) -> tuple[CanaryPlane, list[Change]]:
        """The plane a checkpoint stored, the running canary rebuilt by replaying its inputs;
        with the changes that replay decided (only if the rule's settings changed since)."""
        from rlhf.bus import offsets_from_json

        plane = cls(
            config,
            int(data["stable"]),
            enabled=bool(data.get("enabled", config.enabled)),
            share=float(data.get("share", config.share)),
            offsets=offsets_from_json(data.get("offsets", [])),
            history=list(data.get("history", [])),
        )
        changes: list[Change] = []
        candidate = int(data.get("candidate") or 0)
        if candidate:
            started = float(data["started_seconds"])
            plane.controller.propose(candidate, started)
            plane._started = started
            for raw in data.get("records", []):
                changes += plane._observe(_record_from(raw))
            for q in data.get("queued", []):
                if plane.config.new_candidate == "queue" or not plane.candidate:
                    changes.append(plane.propose(int(q), started))
        plane.controller.ignored.update({k: int(v) for k, v in data.get("ignored", {}).items()})
        return plane, changes

    # --- metrics --------------------------------------------------------------------------
    def export(self, now_seconds: float | None = None) -> None:
        metrics.CANARY_ENABLED.set(int(self.enabled))
        metrics.CANARY_STABLE_VERSION.set(self.stable)
        metrics.CANARY_CANDIDATE_VERSION.set(self.candidate)
        metrics.CANARY_SHARE.set(self.share if self.candidate else 0.0)
        metrics.CANARY_QUEUED.set(len(self.queued))
        ev = self.evidence(now_seconds) or {}
        for role in ROLES:
            up, down = int(ev.get(f"thumbs_up_{role}", 0)), int(ev.get(f"thumbs_down_{role}", 0))
            metrics.CANARY_THUMBS.labels(role, "up").set(up)
            metrics.CANARY_THUMBS.labels(role, "down").set(down)
            n = up + down
            metrics.CANARY_THUMBS_UP.labels(role).set(up / n if n else math.nan)
            lo, hi = wilson(up, n)
            metrics.CANARY_THUMBS_UP_LOWER.labels(role).set(lo)
            metrics.CANARY_THUMBS_UP_UPPER.labels(role).set(hi)
        won_c, won_s = int(ev.get("wins_candidate", 0)), int(ev.get("wins_stable", 0))
        metrics.CANARY_COMPARISONS.labels("won_candidate").set(won_c)
        metrics.CANARY_COMPARISONS.labels("won_stable").set(won_s)
        metrics.CANARY_COMPARISONS.labels("tie").set(int(ev.get("ties", 0)))
        decided = won_c + won_s
        metrics.CANARY_WIN_RATE.set(won_c / decided if decided else math.nan)
        lo, hi = wilson(won_c, decided)
        metrics.CANARY_WIN_RATE_LOWER.set(lo)
        metrics.CANARY_WIN_RATE_UPPER.set(hi)
        metrics.CANARY_LOG_E.labels("promote").set(float(ev.get("log_e_promote", 0.0)))
        metrics.CANARY_LOG_E.labels("rollback").set(float(ev.get("log_e_rollback", 0.0)))
        metrics.CANARY_LOG_THRESHOLD.labels("promote").set(-math.log(self.config.promote_alpha))
        metrics.CANARY_LOG_THRESHOLD.labels("rollback").set(-math.log(self.config.rollback_alpha))
        metrics.CANARY_ALERT.set(int(bool(ev.get("alert", False))))
