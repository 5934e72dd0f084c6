"""The learner process: Kafka rollouts in, PPO steps, checkpoints, gated policy versions out.

One thread runs `Learner.run`; the gRPC control plane talks to it through thread-safe
methods (status, pause, resume, versions, rollback). Each iteration of the loop:

  1. poll Rollout events; dead-letter invalid ones (token ids outside the vocabulary,
     non-finite values, lengths that disagree, a version never given out) and drop ones
     more than max_policy_lag versions behind the current weights (both counted); with
     user_feedback, poll Feedback events too (rlhf/learner/feedback_intake.py): meaningless
     ones dead-lettered, the rest buffered until the next step
  2. once batch_size fresh rollouts are buffered, one PPO step on the oldest of them (with
     up to user_feedback_max_per_step buffered feedback events, rlhf/learner/feedback_loss.py;
     with user_feedback_alone, that many feedback events and no rollout batch: a step on them alone); a
     step that raises or goes non-finite is undone and its batch dead-lettered, and the
     loop goes on (after MAX_FAILED_STEPS_IN_A_ROW of them it gives up, loudly)
  3. ledger line (event ids trained and dropped), then a checkpoint holding the Kafka
     offsets below which everything is handled, then the Kafka commit of those offsets
  4. every publish_every steps a new version: drift gate, weight store, PolicyUpdate
     (with canaries on, rlhf/learner/canary.py: a version that passes the gate goes to
     canary, and users' feedback, read by a consumer of its own between iterations — also
     while paused — decides whether it becomes stable)

A broker outage does not stop the loop: a poll, commit or announcement that fails is
logged and counted (rlhf_learner_kafka_errors_total) and tried again — a commit at the
next checkpoint (the checkpoint, not the commit, is what a restart trusts), an
announcement at the top of the next iterations until it goes through.

Exactly-once training under SIGKILL: the checkpoint is the source of truth. Restarting
loads it, seeks the consumer to its offsets and cuts the ledger back to its step, so a
rollout is in the restored model's history exactly once, whatever moment the kill hit.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from kafka.errors import KafkaError

from rlhf.bus import PublishError
from rlhf.errors import FailedPrecondition, NotFound
from rlhf.learner import metrics
from rlhf.learner.batch import RolloutLimits, collate
from rlhf.learner.canary import CanaryPlane, Change, LearnerCanaryConfig
from rlhf.learner.checkpoint import CheckpointStore, Ledger
from rlhf.learner.config import LearnerConfig
from rlhf.learner.distributed import Ranks
from rlhf.learner.drift import DEFAULT_HELDOUT_PROMPTS, DriftGate, GateResult
from rlhf.learner.feedback_intake import FeedbackChannel
from rlhf.learner.feedback_loss import collate_feedback
from rlhf.learner.intake import LearnerState, RolloutIntake
from rlhf.learner.policy import build_policy
from rlhf.learner.trainer import PPOTrainer
from rlhf.learner.versions import verdict, version_info, weight_format_proto
from rlhf.prompts import load_prompt_texts
from rlhf.tracking import Tracker, open_tracker
from rlhf.weightstore import CorruptWeights, UnknownVersion, VersionRecord, WeightStore

log = logging.getLogger(__name__)

# Failed PPO steps one after another before the loop stops containing them: a learner that
# cannot train any batch (a broken device, a bad model) must exit for its supervisor to see,
# not dead-letter every rollout while it reports SERVING.
MAX_FAILED_STEPS_IN_A_ROW = 3


# What a broker that is down or restarting raises from a poll, a commit or a publish.
KAFKA_ERRORS = (KafkaError, PublishError)


class Learner:
    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str | Path,
        state_dir: str | Path,
        bootstrap: str,
        topic_prefix: str = "rlhf",
        weight_store: str | Path | None = None,
        canary: LearnerCanaryConfig | None = None,
        ranks: Ranks | None = None,
    ):
        """`canary`: the promotion controller's settings (None: no canary plane at all, the
        Promote/SetCanary/GetCanary RPCs answer FAILED_PRECONDITION)."""
        from rlhf.bus import Topics

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.state_dir = Path(state_dir)
        self.bootstrap = bootstrap
        self.topics = Topics(topic_prefix)
        self.weights_dir = Path(weight_store) if weight_store else self.state_dir / "weights"
        self.state = LearnerState()
        self.last_stats: dict[str, float] = {}
        self.paused = threading.Event()
        self._lock = threading.Lock()  # guards state/last_stats reads from the gRPC threads
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self.intake: RolloutIntake | None = None  # made by _recover, around the restored state
        self.feedback: FeedbackChannel | None = None  # users' Feedback events; user_feedback != "none" only
        self._loop_thread: threading.Thread | None = None
        self._failed_in_a_row = 0  # PPO steps failed since the last one that trained
        self.consumer = self.producer = None
        self.tracker = Tracker(None, "learner")  # start() opens the one cfg.tracking asks for
        self.canary_config = canary
        self.canary: CanaryPlane | None = None  # made by _recover (from the checkpoint, or afresh)
        self.canary_consumer = None  # rlhf.feedback for the canary, own group; opened while canaries are on
        self._canary_unannounced: list[Change] = []  # changes a broker outage kept from being announced
        self._canary_ticked = 0.0
        # this process is rank 0 of `ranks` (rlhf/learner/distributed.py): the others follow its trainer
        self.ranks = ranks or Ranks.single()

    # --- start-up and recovery ---------------------------------------------------------

    def start(self) -> None:
        """Load the model, restore the latest checkpoint, connect to Kafka (blocking)."""
        from rlhf.bus import EventConsumer, EventProducer, ensure_topics
        from rlhf.models import chat_prompt_ids, load_tokenizer, pad_id, resolve_device, set_torch_threads
        from rlhf.v1 import events_pb2

        cfg = self.cfg
        set_torch_threads(cfg.torch_threads)
        device = self.ranks.device(resolve_device(cfg.device))
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = pad_id(self.tokenizer)
        self.policy = build_policy(self.model_dir, cfg, device)
        self.trainer = PPOTrainer(self.policy, cfg, self.ranks)
        prompts = (
            load_prompt_texts(path=cfg.drift_prompts_file) if cfg.drift_prompts_file else list(DEFAULT_HELDOUT_PROMPTS)
        )
        self.gate = DriftGate(
            [chat_prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts],
            budget=cfg.drift_kl_budget,
            pad_id=self.pad_id,
            eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=cfg.drift_max_new_tokens,
            samples_per_prompt=cfg.drift_samples_per_prompt,
            temperature=cfg.temperature,
        )
        self.store = WeightStore(self.weights_dir)
        self.checkpoints = CheckpointStore(self.state_dir / "learner" / "checkpoints", keep=cfg.keep_checkpoints)
        self.ledger = Ledger(self.state_dir / "learner" / "ledger.jsonl")
        metrics.DRIFT_KL_BUDGET.set(cfg.drift_kl_budget)

        feedback_topics = (
            [self.topics.feedback, self.topics.dlq(self.topics.feedback)] if cfg.user_feedback != "none" else []
        )
        ensure_topics(
            self.bootstrap,
            [self.topics.rollouts, self.topics.dlq(self.topics.rollouts), self.topics.policy_updates, *feedback_topics],
        )
        self.producer = EventProducer(self.bootstrap, client_id="learner")
        self.consumer = EventConsumer(
            self.bootstrap,
            self.topics.rollouts,
            events_pb2.Rollout,
            cfg.group_id,
            dlq_producer=self.producer,
            on_reset=self._on_log_reset,
        )
        if cfg.user_feedback != "none":  # with "none" the learner never reads rlhf.feedback
            consumer = EventConsumer(
                self.bootstrap,
                self.topics.feedback,
                events_pb2.Feedback,
                cfg.group_id,
                dlq_producer=self.producer,
                client_id=f"{cfg.group_id}-feedback",
                on_reset=self._on_feedback_log_reset,
            )
            self.feedback = FeedbackChannel(consumer, cfg, self.tokenizer, self.policy.causal_lm)
        self.tracker = open_tracker(cfg.tracking, self.state_dir, "learner")
        self._recover()
        self.trainer.share_state()  # the other ranks (if any) start from the restored state

    def _open_canary_consumer(self, log_ids: dict[str, str] | None = None) -> None:
        """The canary's own rlhf.feedback consumer (group `<group_id>-canary`), at the plane's offsets."""
        from rlhf.bus import EventConsumer, ensure_topics
        from rlhf.v1 import events_pb2

        if self.canary_consumer is not None:
            return
        ensure_topics(self.bootstrap, [self.topics.feedback, self.topics.dlq(self.topics.feedback)])
        self.canary_consumer = EventConsumer(
            self.bootstrap,
            self.topics.feedback,
            events_pb2.Feedback,
            f"{self.cfg.group_id}-canary",
            dlq_producer=self.producer,
            client_id=f"{self.cfg.group_id}-canary",
            on_reset=self._on_canary_log_reset,
        )
        if self.canary.offsets and self.canary_consumer.seek(self.canary.offsets, log_ids=log_ids) is not None:
            self.canary.offsets = {}  # a lost log: the new one is read from its start

    def _recover(self) -> None:
        """Restore the latest checkpoint (or start fresh), finish an interrupted publication,
        and announce the serving version again.

        The re-announcement is what a generator and the rollout worker learn the version
        from when rlhf.policy-updates lost its history (the in-memory broker restarted): a
        normal PolicyUpdate (PROMOTED, the stored version's sha256 and format), which a
        generator already serving it ignores and which opens a new rollout budget. If the
        rollouts log the checkpoint's offsets point into is gone, the consumer reads the new
        one from its start (EventConsumer.seek with the stored log ids); rollouts are
        regenerated by the worker.
        """
        folder = self.checkpoints.latest()
        log_ids = None  # which logs the checkpoint's offsets point into
        if folder is not None:
            meta = CheckpointStore.load(folder, self.policy, self.trainer)
            log_ids = meta.get("kafka_log_ids")
            self.state = LearnerState.from_json(meta["state"])
            self.last_stats = meta.get("last_stats", {})
            if self.consumer.seek(self.state.offsets, log_ids=log_ids) is not None:
                self.state.offsets = self.consumer.positions()  # the start of the new rollouts log
                self.state.handled_above = {}
            log.info(
                "restored checkpoint",
                extra={"checkpoint": folder.name, "step": self.state.step, "version": self.state.version},
            )
        else:
            latest = self.store.latest()
            if latest is not None:  # a store that outlived its checkpoints: keep numbers unique
                self.state.version = latest.version
            if not any(r.version == 0 for r in self.store.versions()):
                initial = GateResult(kl=0.0, budget=self.cfg.drift_kl_budget, passed=True, reason="initial policy")
                self._store_version(0, parent=0, meta=verdict(0, initial))
        self.intake = self._new_intake()
        if self.feedback is not None:
            self.feedback.restore(self.state, log_ids)  # no stored feedback offsets: no seek (feedback_intake.py)
        replayed: list[Change] = []
        if self.canary_config is not None:
            stored = meta.get("canary") if folder is not None else None
            if stored:
                self.canary, replayed = CanaryPlane.from_json(self.canary_config, stored)
                if self.canary.stable != self.state.serving_version and not self.canary.candidate:
                    self.canary.follow(self.state.serving_version)  # promoted the old way since
            else:
                self.canary = CanaryPlane.new(self.canary_config, self.state.serving_version)
            if self.canary.enabled:
                self._open_canary_consumer(log_ids)
        self.tracker.rewind(self.state.step)  # steps past the checkpoint are trained again
        cut = self.ledger.truncate_after(self.state.step)
        if cut:
            log.info("ledger cut back to the checkpoint", extra={"entries_removed": cut})
        if self.state.pending_publish is not None:
            log.info("finishing an interrupted publication", extra={"version": self.state.pending_publish})
            self._publish(self.state.pending_publish)
        self._announce_serving("serving version re-announced at learner start-up")
        self._announce_canary(replayed)
        self._export_gauges()

    def _on_log_reset(self, reset) -> None:
        """The rollouts log was lost under the running learner (rlhf.bus.LogReset, on the loop
        thread inside poll): forget what points into it, and announce the serving version
        again, since rlhf.policy-updates went with it."""
        with self._lock:
            self.intake.forget_log(reset.topic)
            self.state.offsets = {tp: o for tp, o in self.state.offsets.items() if tp[0] != reset.topic}
        try:
            self._announce_serving("serving version re-announced after the Kafka log was lost")
        except PublishError:  # the broker is flapping: training goes on, the next reset or start announces
            log.exception(
                "re-announcing the serving version after a lost log failed",
                extra={"version": self.state.serving_version},
            )

    def _on_canary_log_reset(self, reset) -> None:
        """The feedback log was lost under the canary's consumer: its offsets point nowhere."""
        self.canary.offsets = {tp: o for tp, o in self.canary.offsets.items() if tp[0] != reset.topic}

    def _on_feedback_log_reset(self, reset) -> None:
        """The feedback log was lost under the running learner (on the loop thread, inside poll)."""
        with self._lock:
            self.feedback.forget_log(reset.topic)

    def _announce_serving(self, reason: str) -> None:
        from rlhf.v1 import events_pb2

        version = self.state.serving_version
        try:
            record = self.store.get(version)
        except (UnknownVersion, CorruptWeights) as e:
            log.error(
                "cannot re-announce the serving version: not in the weight store",
                extra={"version": version, "error": str(e)},
            )
            return
        event = self._update_event(record, events_pb2.POLICY_ACTION_PROMOTED, reason=reason)
        self.producer.publish(self.topics.policy_updates, event, key="policy")
        log.info("serving version announced", extra={"version": version, "reason": reason})
        if self.canary is not None and self.canary.candidate:  # the candidate beside it
            c = self.canary
            self._announce_canary([Change("canary", c.candidate, c.stable, c.candidate, reason)])

    # --- the loop ----------------------------------------------------------------------

    def _new_intake(self) -> RolloutIntake:
        """An intake around the current state that validates against the policy's own
        vocabulary and length, and dead-letters what it refuses."""
        return RolloutIntake(
            self.state,
            self.cfg.batch_size,
            self.cfg.max_policy_lag,
            limits=RolloutLimits.of(self.policy.causal_lm),
            dead_letter=self.consumer.dead_letter,
            group_objective=self.cfg.objective if self.cfg.whole_groups else None,
        )

    def run(self, stop: threading.Event) -> None:
        """Train until `stop` is set. Control-plane commands run between steps."""
        self._loop_thread = threading.current_thread()
        try:
            while not stop.is_set():
                self._run_commands()
                self.trainer.keep_alive()  # the other ranks wait for rank 0's next command
                self._canary_iteration()
                if self.paused.is_set():
                    stop.wait(0.1)
                    continue
                if self.state.pending_publish is not None:  # an announcement a broker outage held up
                    if not self._try_publish(self.state.pending_publish):
                        stop.wait(1.0)
                        continue
                if len(self.intake) < self.cfg.max_buffered_rollouts:
                    wait_ms = 0 if len(self.intake) >= self.cfg.batch_size else 200
                    try:
                        polled = self.consumer.poll(timeout_ms=wait_ms, max_records=self.cfg.batch_size * 4)
                    except KAFKA_ERRORS as e:  # the consumer rewound: the next poll reads the same records
                        self._kafka_failed("poll", e)
                        stop.wait(1.0)
                        continue
                    self.intake.add(polled)
                if self.feedback is not None:
                    try:
                        polled = self.feedback.poll()
                    except KAFKA_ERRORS as e:
                        self._kafka_failed("poll", e, topic=self.topics.feedback)
                        stop.wait(1.0)
                        continue
                    self.feedback.intake.add(polled)
                if self.paused.is_set():  # paused during the poll: train nothing it returned
                    continue
                records = self.intake.take_batch()
                if records or self._feedback_alone_due():
                    self._train(records or [])
        finally:
            self._loop_thread = None
            self._run_commands()  # fail nobody waiting: run what is queued

    def _feedback_alone_due(self) -> bool:
        """No rollout batch is ready and a full step of users' feedback is (user_feedback_alone)."""
        return (
            self.feedback is not None
            and self.cfg.user_feedback_alone
            and len(self.feedback.intake) >= self.cfg.user_feedback_max_per_step
        )

    def _train(self, records: list) -> None:
        """One step on `records` (rollouts) with the users' feedback waiting; `records` empty:
        on that feedback alone (user_feedback_alone)."""
        cfg, state = self.cfg, self.state
        # 1. the PPO step (all or nothing: a failure leaves the weights as they were), with the
        #    users' feedback examples waiting since the last step (user_feedback)
        events = [r.event for r in records]
        lags = [state.lag(e.policy_version) for e in events]
        feedback = self.feedback.take() if self.feedback is not None else []
        try:
            examples = collate_feedback([ex for _, exs in feedback for ex in exs], self.pad_id)
            stats = self.trainer.step(collate(events, self.pad_id) if events else None, examples)
        except Exception as e:  # noqa: BLE001 - contained: the batch is dead-lettered, training goes on
            self._step_failed(records, e, feedback)
            return
        self._failed_in_a_row = 0
        if lags:
            stats["staleness_mean"] = sum(lags) / len(lags)
            stats["staleness_max"] = float(max(lags))
        else:
            metrics.FEEDBACK_ALONE_STEPS.inc()

        # 2. bookkeeping: step, maybe a new version
        with self._lock:
            state.step += 1
            state.rollouts_trained += len(records)
            state.steps_since_version += 1
            if state.steps_since_version >= cfg.publish_every:
                state.pending_publish = state.new_version()
            state.offsets, state.handled_above = self.intake.safe_offsets(), self.intake.handled_above()
            if self.feedback is not None:
                self.feedback.trained(feedback)
            self.last_stats = stats
        metrics.ROLLOUTS_TRAINED.inc(len(records))
        metrics.observe_step(stats)
        self.tracker.log(state.step, stats)

        # 3. ledger, checkpoint, then the Kafka commit the checkpoint covers
        from rlhf.bus import offsets_to_json

        self.ledger.append(
            {
                "step": state.step,
                "version": state.lineage[-1],
                "trained": [e.event_id for e in events],
                **self.intake.pop_dropped(),
                "offsets": offsets_to_json(state.offsets),
                **(self.feedback.ledger_fields(feedback) if self.feedback is not None else {}),
            }
        )
        if state.step % cfg.checkpoint_every == 0 or state.pending_publish is not None:
            self._checkpoint()
        log.info(
            "ppo step",
            extra={"step": state.step, "version": state.lineage[-1], **{k: round(v, 5) for k, v in stats.items()}},
        )

        # 4. the new version, if one is due (a failed announcement is retried by the loop)
        if state.pending_publish is not None:
            self._try_publish(state.pending_publish)
        self._export_gauges()

    def _try_publish(self, version: int) -> bool:
        """`_publish`, with a broker that does not acknowledge the announcement logged and
        counted instead of raised: the version stays pending and the loop tries again."""
        try:
            self._publish(version)
        except KAFKA_ERRORS as e:
            self._kafka_failed("publish", e, version=version)
            return False
        return True

    def _kafka_failed(self, operation: str, error: Exception, **extra: Any) -> None:
        metrics.KAFKA_ERRORS.labels(operation).inc()
        log.error(
            "Kafka %s failed; the learner keeps its state and tries again",
            operation,
            extra={"operation": operation, "error": f"{type(error).__name__}: {error}"[:500], **extra},
        )

    def _step_failed(self, records: list, error: Exception, feedback: list = ()) -> None:
        """Dead-letter a batch whose step raised (PPOTrainer.step has undone it), and the
        feedback events taken for it, count them, and carry on; the ledger's next line lists
        their event ids under "failed" and "feedback_failed". Raises once
        MAX_FAILED_STEPS_IN_A_ROW steps have failed one after another."""
        self._failed_in_a_row += 1
        reason = f"PPO step failed: {type(error).__name__}: {error}"[:2000]
        log.error(
            "PPO step failed; its batch is dead-lettered and training goes on",
            exc_info=error,
            extra={
                "step": self.state.step,
                "rollouts": len(records),
                "failed_in_a_row": self._failed_in_a_row,
                "event_ids": [r.event.event_id for r in records],
            },
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory step leaves its blocks cached
        for rec in records:
            self.consumer.dead_letter(rec, reason, kind="failed")
        with self._lock:
            self.intake.record_failed(records)
            if feedback:
                self.feedback.failed(feedback, reason)
        metrics.STEPS_FAILED.inc()
        metrics.ROLLOUTS_FAILED.inc(len(records))
        if self._failed_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
            raise RuntimeError(
                f"{self._failed_in_a_row} PPO steps in a row failed, the last with {type(error).__name__}: "
                f"{error}; the learner cannot train and stops (its batches are on {self.topics.rollouts}.dlq)"
            ) from error

    def _checkpoint(self) -> None:
        start = time.perf_counter()
        canary_offsets: dict = {}
        with self._lock:
            meta = {
                "state": self.state.to_json(),
                "last_stats": self.last_stats,
                "config": self.cfg.model_dump(mode="json"),
                "base_model": str(self.model_dir),
                # which logs state.offsets (and feedback_offsets) point into: a lost one is read again from its start
                "kafka_log_ids": {
                    **self.consumer.log_ids(),
                    **(self.feedback.consumer.log_ids() if self.feedback is not None else {}),
                    **(self.canary_consumer.log_ids() if self.canary_consumer is not None else {}),
                },
            }
            if self.canary is not None:  # the canary's inputs and offsets: replayed on restore (canary.py)
                meta["canary"] = self.canary.to_json()
                canary_offsets = dict(self.canary.offsets)
        self.checkpoints.save(self.state.step, self.policy, self.trainer, meta)
        try:
            self.consumer.commit(self.state.offsets)
            if self.feedback is not None:
                self.feedback.consumer.commit(self.state.feedback_offsets)
            if self.canary_consumer is not None and canary_offsets:
                self.canary_consumer.commit(canary_offsets)
        except KAFKA_ERRORS as e:  # the checkpoint holds the offsets; the next one commits them
            self._kafka_failed("commit", e, step=self.state.step)
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - start)

    # --- versions ----------------------------------------------------------------------

    def _store_version(self, version: int, parent: int, meta: dict[str, Any]) -> VersionRecord:
        return self.store.put(
            version,
            self.policy.policy_state_dict(),
            fmt=self.policy.finetune,
            adapter_config=self.policy.adapter_config(),
            parent=parent,
            base_model=str(self.model_dir),
            meta=meta,
        )

    def _publish(self, version: int) -> None:
        """Gate, store and announce `version` (the current weights). Idempotent: after a
        crash the stored verdict is reused and the announcement sent again."""
        from rlhf.v1 import events_pb2

        state = self.state
        try:
            record = self.store.get(version)
        except UnknownVersion:  # not stored yet: gate it now
            result = self.gate.check(self.policy)
            metrics.DRIFT_KL.set(result.kl)
            self.tracker.log(state.step, {"drift_kl": result.kl, "drift_promoted": float(result.passed)})
            parent = state.lineage[-2] if len(state.lineage) > 1 else 0
            record = self._store_version(version, parent, verdict(state.step, result))
            metrics.VERSIONS_PUBLISHED.inc()
        promoted = bool(record.meta.get("promoted"))
        if promoted and self.canary is not None and self.canary.enabled:
            # the users decide: the version goes to canary (or waits, or is refused: new_candidate)
            with self._lock:
                change = self.canary.propose(version, time.time())
            self._announce_canary([change])
            with self._lock:
                state.pending_publish = None
            self._export_gauges()
            return
        action = events_pb2.POLICY_ACTION_PROMOTED if promoted else events_pb2.POLICY_ACTION_REJECTED
        self.producer.publish(self.topics.policy_updates, self._update_event(record, action), key="policy")
        with self._lock:
            if promoted:
                state.serving_version = version
                if self.canary is not None:
                    self.canary.follow(version)
            else:
                metrics.DRIFT_REJECTIONS.inc()
                log.warning(
                    "drift gate rejected a version", extra={"version": version, "reason": record.meta.get("reason")}
                )
                if self.cfg.on_reject == "revert":
                    self._switch_weights(state.serving_version)
            state.pending_publish = None

    def _update_event(
        self, record: VersionRecord, action: int, reason: str | None = None, serving: dict[str, Any] | None = None
    ):
        """The PolicyUpdate announcing `record`. With canaries on it states the whole serving
        state (stable, candidate, share: `serving`, else the plane's now)."""
        from rlhf.bus import new_event
        from rlhf.v1 import events_pb2

        if serving is None and self.canary is not None and self.canary.enabled:
            serving = self.canary.serving()
        return new_event(
            events_pb2.PolicyUpdate,
            version=record.version,
            parent_version=record.parent,
            step=int(record.meta.get("step", 0)),
            uri=record.path,
            sha256=record.sha256,
            format=weight_format_proto(record.format),
            action=action,
            kl_to_reference=float(record.meta.get("kl_to_reference", 0.0)),
            kl_budget=float(record.meta.get("kl_budget", self.cfg.drift_kl_budget)),
            base_model=record.base_model,
            reason=reason if reason is not None else str(record.meta.get("reason", "")),
            **self.worker_terms(),
            **(serving or {}),
        )

    # --- the canary (rlhf/learner/canary.py) -------------------------------------------

    def _canary_iteration(self) -> None:
        """Between two iterations of the loop (paused too): retry what an outage held up,
        read the feedback that arrived, let the clock end an overdue canary, announce."""
        plane = self.canary
        if plane is None or not plane.enabled or self.canary_consumer is None:
            return
        if not self._flush_canary_events():
            return
        try:
            records = self.canary_consumer.poll(timeout_ms=0, max_records=500)
        except KAFKA_ERRORS as e:
            self._kafka_failed("poll", e, topic=self.topics.feedback)
            return
        now = time.time()
        with self._lock:
            changes = plane.observe(records)
            if now - self._canary_ticked >= self.canary_config.tick_seconds:
                self._canary_ticked = now
                changes += plane.tick(now)
        if changes:
            self._announce_canary(changes)
        if records or changes:
            plane.export()

    def _announce_canary(self, changes: list[Change]) -> None:
        """Act on canary changes in order: the learner's serving version (and, on a roll back
        with on_reject=revert, its training weights), one PolicyUpdate each stating the whole
        serving state, and a checkpoint after a decision, so a restart does not decide it
        again. Events a broker outage holds up wait, in order, for the next iteration."""
        from rlhf.v1 import events_pb2

        if not changes:
            return
        actions = {
            "canary": events_pb2.POLICY_ACTION_CANARY,
            "promoted": events_pb2.POLICY_ACTION_PROMOTED,
            "rolled_back": events_pb2.POLICY_ACTION_ROLLED_BACK,
            "queued": events_pb2.POLICY_ACTION_REJECTED,  # not served (yet): generators keep what they serve
            "rejected": events_pb2.POLICY_ACTION_REJECTED,
        }
        decided = False
        for change in changes:
            if change.kind in ("promoted", "rolled_back"):
                decided = True
                with self._lock:
                    self.state.serving_version = change.stable
                    self.state.pending_publish = None
                    if change.kind == "rolled_back" and self.cfg.on_reject == "revert":
                        self._switch_weights(change.stable)  # train on from the version users kept
                metrics.SERVING_VERSION.set(change.stable)
            try:
                record = self.store.get(change.version)
            except (UnknownVersion, CorruptWeights) as e:
                log.error(
                    "canary change not announced: its version is not in the weight store",
                    extra={"version": change.version, "kind": change.kind, "error": str(e)},
                )
                continue
            serving = {
                "stable_version": change.stable,
                "candidate_version": change.candidate,
                "canary_share": self.canary.share,
            }
            event = self._update_event(record, actions[change.kind], reason=change.reason, serving=serving)
            if change.decision is not None:
                event.decision_json = json.dumps(change.decision, sort_keys=True, default=str)
            self._canary_unannounced.append(event)
        self._flush_canary_events()
        if decided:
            self._checkpoint()
        self.canary.export()
        self._export_gauges()

    def _flush_canary_events(self) -> bool:
        """Publish the canary's events still unannounced, oldest first; False if the broker refused one."""
        from rlhf.v1 import events_pb2

        while self._canary_unannounced:
            event = self._canary_unannounced[0]
            try:
                self.producer.publish(self.topics.policy_updates, event, key="policy")
            except KAFKA_ERRORS as e:
                self._kafka_failed("publish", e, version=event.version)
                return False
            self._canary_unannounced.pop(0)
            log.info(
                "canary policy update published",
                extra={
                    "action": events_pb2.PolicyAction.Name(event.action),
                    "version": event.version,
                    "stable_version": event.stable_version,
                    "candidate_version": event.candidate_version,
                    "canary_share": event.canary_share,
                    "reason": event.reason,
                },
            )
        return True

    def worker_terms(self) -> dict[str, Any]:
        """What the rollout workers must follow, announced in every PolicyUpdate and in the
        status: this learner owns these numbers, the workers configure none of them."""
        return {
            "rollouts_per_version": self.cfg.batch_size * self.cfg.publish_every,
            "max_policy_lag": self.cfg.max_policy_lag,
            "temperature": self.cfg.temperature,
        }

    def _switch_weights(self, version: int) -> None:
        """Make the training weights those of a stored version (revert or rollback)."""
        _, tensors = self.store.load(version)
        self.policy.load_policy_state_dict({k: v.to(self.policy.device) for k, v in tensors.items()})
        self.trainer.reset_optimizer()
        self.trainer.share_state()
        self.state.switch_to(version)

    # --- control plane (any thread) ----------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            s = self.state
            return {
                "paused": self.paused.is_set(),
                "step": s.step,
                "policy_version": s.version,
                "serving_version": s.serving_version,
                "kl_coef": self.trainer.kl_ctl.value,
                "rollouts_trained": s.rollouts_trained,
                "rollouts_dropped_stale": s.rollouts_dropped_stale,
                **({"user_feedback": self.feedback.status()} if self.feedback is not None else {}),
                **({"canary": self.canary.status()} if self.canary is not None else {}),
                "last_stats": dict(self.last_stats),
                **self.worker_terms(),
            }

    def pause(self, timeout: float = 600.0) -> None:
        """Stop training; returns once no step runs, so nothing polled after this is trained."""
        self.paused.set()
        metrics.PAUSED.set(1)
        self._call_in_loop(lambda: None, timeout)  # a barrier: the iteration in flight has ended

    def resume(self) -> None:
        self.paused.clear()
        metrics.PAUSED.set(0)

    def versions(self) -> list:
        return [version_info(r) for r in self.store.versions()]

    def rollback(self, version: int, timeout: float = 600.0):
        """Serve (and train on from) an earlier promoted version; returns its PolicyVersionInfo.
        NotFound for a version not in the weight store, FailedPrecondition for one never
        promoted or whose stored manifest is corrupt (rlhf.errors)."""
        return self._call_in_loop(lambda: self._rollback(version), timeout)

    def _servable(self, version: int, corrupt: str, refused: str):
        """The weight-store record of `version`, which an operator asks to serve (rollback,
        promote): NotFound when it is not stored, FailedPrecondition when its manifest is
        corrupt ("version N <corrupt>: <error>") or it never passed the drift gate
        ("version N <refused>", `{why}` the gate's reason). Each verb words its own refusal."""
        try:
            record = self.store.get(version)
        except UnknownVersion:
            raise NotFound(f"version {version} is not in the weight store") from None
        except CorruptWeights as e:
            raise FailedPrecondition(f"version {version} {corrupt}: {e}") from None
        if not record.meta.get("promoted"):
            why = record.meta.get("reason") or "rejected"
            raise FailedPrecondition(f"version {version} {refused.format(why=why)}")
        return record

    def _rollback(self, version: int):
        from rlhf.v1 import events_pb2

        record = self._servable(
            version,
            corrupt="cannot be served again",
            refused="was never promoted ({why}); roll back to a promoted version (see ListVersions)",
        )
        with self._lock:
            self._switch_weights(version)
            self.state.serving_version = version
            self.state.pending_publish = None
            change = None
            if self.canary is not None:
                if self.canary.enabled:  # a running canary ends: the operator decided
                    change = self.canary.rolled_back(version, time.time())
                else:
                    self.canary.follow(version)
        self._checkpoint()
        event = self._update_event(record, events_pb2.POLICY_ACTION_ROLLED_BACK, reason="operator rollback")
        if change is not None:
            event.decision_json = json.dumps(change.decision, sort_keys=True, default=str)
        self.producer.publish(self.topics.policy_updates, event, key="policy")
        if self.canary is not None:
            self.canary.export()
        metrics.ROLLBACKS.inc()
        self._export_gauges()
        log.warning("rolled back", extra={"version": version})
        return version_info(record)

    def canary_status(self) -> dict[str, Any]:
        """The canary's state now (GetCanary): versions, share, queue, the running evidence, the last decision."""
        with self._lock:
            return self._plane().status(time.time())

    def promote(self, version: int, timeout: float = 600.0) -> dict[str, Any]:
        """Make `version` stable now (an operator's decision, ending a running canary): the
        candidate, a queued one or any version that passed the drift gate. NotFound for a
        version not stored, FailedPrecondition for one the gate refused or the stable one."""
        return self._call_in_loop(lambda: self._promote(version), timeout)

    def _promote(self, version: int) -> dict[str, Any]:
        plane = self._plane()
        self._servable(
            version,
            corrupt="cannot be served",
            refused="did not pass the drift gate ({why}); promote a version that did (see ListVersions)",
        )
        with self._lock:
            changes = plane.promote(version, time.time())
        self._announce_canary(changes)
        log.warning("promoted by the operator", extra={"version": version})
        return self.canary_status()

    def set_canary(
        self, share: float | None = None, enabled: bool | None = None, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Change the candidate's share of new conversations and/or turn canaries on or off
        (off is refused while a candidate runs: promote or roll it back first)."""
        return self._call_in_loop(lambda: self._set_canary(share, enabled), timeout)

    def _set_canary(self, share: float | None, enabled: bool | None) -> dict[str, Any]:
        plane = self._plane()
        changes = []
        with self._lock:
            if share is not None:
                change = plane.set_share(share)
                changes += [change] if change is not None else []
            if enabled is not None:
                plane.set_enabled(enabled, self.state.serving_version)
        if plane.enabled:
            self._open_canary_consumer()
        if changes:
            self._announce_canary(changes)
        self._checkpoint()  # an operator's setting outlives a restart
        plane.export()
        log.warning("canary settings changed", extra={"share": plane.share, "enabled": plane.enabled})
        return self.canary_status()

    def _plane(self) -> CanaryPlane:
        if self.canary is None:
            raise FailedPrecondition("this learner runs no canary plane (it was started without canary settings)")
        return self.canary

    def _call_in_loop(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run fn on the training thread between steps (or here, if no loop runs)."""
        if self._loop_thread is None or self._loop_thread is threading.current_thread():
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future.result(timeout)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _export_gauges(self) -> None:
        metrics.POLICY_VERSION.set(self.state.version)
        metrics.SERVING_VERSION.set(self.state.serving_version)
        if self.canary is not None:
            self.canary.export()

    def close(self) -> None:
        self.tracker.close()
        if self.consumer is not None:
            self.consumer.close()
        if self.feedback is not None:
            self.feedback.consumer.close()
        if self.canary_consumer is not None:
            self.canary_consumer.close()
        if self.producer is not None:
            self.producer.close()
        if getattr(self, "trainer", None) is not None:
            self.trainer.release()  # the other ranks exit too
