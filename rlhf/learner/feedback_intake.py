"""The learner's second intake: users' Feedback events from rlhf.feedback, exactly once.

`FeedbackIntake` turns polled records into examples (rlhf/learner/feedback.py) that wait,
oldest first, in a bounded buffer for the next learner step; skipped and invalid events are
handled at once (the invalid dead-lettered with their reason). `FeedbackChannel` is that
intake with its consumer, as the loop (rlhf/learner/loop.py) drives it.

Exactly once, as for rollouts (rlhf/learner/intake.py): records are taken oldest first, so
per partition the offset below which everything is handled is the lowest buffered one (or
one past the last handled); the checkpoint stores it (LearnerState.feedback_offsets, and
the handled offsets above it, feedback_handled_above: a skipped or invalid event behind a
buffered one), a restart seeks there, and the ledger line of each step lists the feedback
event ids it trained (`feedback`) and those it skipped, dead-lettered or failed.

A checkpoint without feedback offsets (one from before user_feedback, or of a learner that
ran with "none") does not seek: the consumer starts at the group's committed offsets, else
at the topic's beginning. The learner commits only what its checkpoint holds, so both mean
"never trained here", and the retained history is trained once (docs/learner.md says why
not from the end).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from rlhf.learner import metrics
from rlhf.learner.feedback import ANSWER, PAIR, FeedbackExample, FeedbackLimits, feedback_examples
from rlhf.learner.intake import HandledAbove, LearnerState
from rlhf.validation import Invalid

if TYPE_CHECKING:
    from rlhf.bus import Offsets

log = logging.getLogger(__name__)

BUFFERED_STEPS = 4  # the buffer holds this many steps' worth of events (user_feedback_max_per_step each)
Taken = list[tuple[Any, list[FeedbackExample]]]  # (rlhf.bus Record, its examples), oldest first


DeadLetter = Callable[[Any, str], None]  # (rlhf.bus Record, reason): EventConsumer.dead_letter


class FeedbackIntake:
    """Polled Feedback records → examples waiting for the next step, oldest first, bounded;
    skipped and invalid events handled at once; the offsets a checkpoint may store."""

    def __init__(
        self,
        state: LearnerState,
        mode: str,
        tokenizer: Any,
        limits: FeedbackLimits,
        max_per_step: int,
        dead_letter: DeadLetter | None = None,
    ):
        """`state`: the LearnerState whose feedback_* counters this updates and whose
        feedback_offsets it starts from; `dead_letter` receives each invalid record with its
        reason before it counts as handled (a failure propagates: the record is not skipped)."""
        self.state = state
        self.mode = mode
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_per_step = max_per_step
        self.max_buffered = BUFFERED_STEPS * max_per_step
        self.dead_letter = dead_letter
        self._buffer: deque = deque()  # (record, examples), poll order
        self._handled: Offsets = dict(state.feedback_offsets)  # per partition: one past the last handled
        # per partition: offsets handled at or above the stored offset (skipped or invalid events
        # behind a buffered one); those read again after a restart are not handled twice
        self._done: dict[tuple[str, int], set[int]] = {tp: set(o) for tp, o in state.feedback_handled_above.items()}
        self.dropped: dict[str, list[str]] = self._no_drops()  # event ids since the last step, per kind

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.max_buffered

    def add(self, records: list) -> None:
        for rec in records:
            if rec.offset in self._done.get((rec.topic, rec.partition), ()):  # handled before the restart
                self._mark_handled(rec)
                continue
            got = feedback_examples(rec.event, self.mode, self.tokenizer, self.limits)
            if isinstance(got, Invalid):
                log.warning(
                    "invalid feedback dead-lettered",
                    extra={"event_id": rec.event.event_id, "offset": rec.offset, "reason": str(got)},
                )
                if self.dead_letter is not None:
                    self.dead_letter(rec, str(got))
                self._drop(rec, "feedback_invalid")
                self.state.feedback_invalid += 1
                metrics.FEEDBACK_INVALID.labels(got.reason).inc()
            elif not got:
                self._drop(rec, "feedback_skipped")
                self.state.feedback_skipped += 1
                metrics.FEEDBACK_SKIPPED.inc()
            else:
                self._buffer.append((rec, got))

    def take(self) -> Taken:
        """The oldest user_feedback_max_per_step buffered events and their examples, handled from now on."""
        taken = [self._buffer.popleft() for _ in range(min(self.max_per_step, len(self._buffer)))]
        for rec, _ in taken:
            self._mark_handled(rec)
        return taken

    def safe_offsets(self) -> Offsets:
        """Per partition, the offset below which every feedback record is handled."""
        safe = dict(self._handled)
        for rec, _ in self._buffer:
            key = (rec.topic, rec.partition)
            safe[key] = min(safe.get(key, rec.offset), rec.offset)
        return safe

    def handled_above(self) -> HandledAbove:
        """Per partition, the handled offsets at or above safe_offsets(): what a checkpoint
        stores beside them (LearnerState.feedback_handled_above)."""
        safe = self.safe_offsets()
        out: HandledAbove = {}
        for key, done in self._done.items():
            done.difference_update([o for o in done if o < safe.get(key, 0)])
            if done:
                out[key] = sorted(done)
        return out

    def record_trained(self, taken: Taken) -> None:
        examples = [ex for _, exs in taken for ex in exs]
        pairs = sum(ex.kind == PAIR for ex in examples)
        self.state.feedback_trained += len(taken)
        self.state.feedback_pairs_trained += pairs
        self.state.feedback_answers_trained += len(examples) - pairs
        metrics.FEEDBACK_EXAMPLES_TRAINED.labels(PAIR).inc(pairs)
        metrics.FEEDBACK_EXAMPLES_TRAINED.labels(ANSWER).inc(len(examples) - pairs)

    def record_failed(self, taken: Taken) -> None:
        """Taken events whose step raised (already dead-lettered): counted, in the next ledger line."""
        self.dropped["feedback_failed"] += [rec.event.event_id for rec, _ in taken]
        self.state.feedback_failed += len(taken)

    def forget_log(self, topic: str) -> None:
        """`topic`'s log was lost (rlhf.bus.LogReset): drop what points into it."""
        self._buffer = deque((rec, exs) for rec, exs in self._buffer if rec.topic != topic)
        self._handled = {tp: o for tp, o in self._handled.items() if tp[0] != topic}
        self._done = {tp: o for tp, o in self._done.items() if tp[0] != topic}

    def pop_dropped(self) -> dict[str, list[str]]:
        dropped, self.dropped = self.dropped, self._no_drops()
        return dropped

    @staticmethod
    def _no_drops() -> dict[str, list[str]]:
        return {"feedback_skipped": [], "feedback_invalid": [], "feedback_failed": []}

    def _drop(self, rec, kind: str) -> None:
        self.dropped[kind].append(rec.event.event_id)
        self._mark_handled(rec)

    def _mark_handled(self, rec) -> None:
        key = (rec.topic, rec.partition)
        self._handled[key] = max(self._handled.get(key, 0), rec.offset + 1)
        self._done.setdefault(key, set()).add(rec.offset)


class FeedbackChannel:
    """The rlhf.feedback consumer and its intake, as one learner drives them."""

    def __init__(self, consumer: Any, cfg: Any, tokenizer: Any, lm: Any):
        """`consumer`: an rlhf.bus.EventConsumer of Feedback events; `cfg` the LearnerConfig;
        `tokenizer` and `lm` the policy's (chat template, vocabulary, positions)."""
        self.consumer, self.cfg, self.tokenizer = consumer, cfg, tokenizer
        self.limits = FeedbackLimits.of(cfg, lm)
        self.intake: FeedbackIntake | None = None  # restore() makes it, around the restored state

    def restore(self, state: LearnerState, log_ids: dict[str, str] | None) -> None:
        """Seek to the checkpoint's feedback offsets (if it has any) and start the intake there;
        offsets into a lost log are replaced by the new log's start."""
        if state.feedback_offsets:
            if self.consumer.seek(state.feedback_offsets, log_ids=log_ids) is not None:
                state.feedback_offsets = self.consumer.positions()
                state.feedback_handled_above = {}
        self.intake = FeedbackIntake(
            state,
            self.cfg.user_feedback,
            self.tokenizer,
            self.limits,
            self.cfg.user_feedback_max_per_step,
            dead_letter=self.consumer.dead_letter,
        )

    def poll(self) -> list:
        """What has arrived (no waiting: the rollouts' poll paces the loop), nothing while the
        buffer is full; for `intake.add`. A Kafka error propagates and the next poll reads the
        same records. (A dead letter that fails inside `add` must stop the loop, as for
        rollouts: the consumer is past that record, and only a restart from the checkpoint
        reads it again.)"""
        if self.intake.full:
            return []
        return self.consumer.poll(timeout_ms=0, max_records=self.cfg.user_feedback_max_per_step)

    def take(self) -> Taken:
        return self.intake.take()

    def trained(self, taken: Taken) -> None:
        """The step with `taken` succeeded: count it, and move the state's offsets on."""
        self.intake.record_trained(taken)
        state = self.intake.state
        state.feedback_offsets, state.feedback_handled_above = self.intake.safe_offsets(), self.intake.handled_above()

    def failed(self, taken: Taken, reason: str) -> None:
        """The step with `taken` raised (and was undone): its events go to the dead-letter topic."""
        for rec, _ in taken:
            self.consumer.dead_letter(rec, reason, kind="failed")
        self.intake.record_failed(taken)
        metrics.FEEDBACK_FAILED.inc(len(taken))

    def ledger_fields(self, taken: Taken) -> dict[str, Any]:
        """The ledger line's feedback fields: event ids trained, skipped, dead-lettered or
        failed since the last line, and the offsets the checkpoint stores."""
        from rlhf.bus import offsets_to_json

        return {
            "feedback": [rec.event.event_id for rec, _ in taken],
            **self.intake.pop_dropped(),
            "feedback_offsets": offsets_to_json(self.intake.state.feedback_offsets),
        }

    def forget_log(self, topic: str) -> None:
        """The feedback log was lost under the running learner (rlhf.bus.LogReset): forget
        what points into it; the consumer reads the new log from its start."""
        state = self.intake.state
        self.intake.forget_log(topic)
        state.feedback_offsets = {tp: o for tp, o in state.feedback_offsets.items() if tp[0] != topic}
        state.feedback_handled_above = {tp: o for tp, o in state.feedback_handled_above.items() if tp[0] != topic}

    def status(self) -> dict[str, int]:
        s = self.intake.state
        return {
            "trained": s.feedback_trained,
            "pairs_trained": s.feedback_pairs_trained,
            "answers_trained": s.feedback_answers_trained,
            "skipped": s.feedback_skipped,
            "invalid": s.feedback_invalid,
            "failed": s.feedback_failed,
            "buffered": len(self.intake),
        }
