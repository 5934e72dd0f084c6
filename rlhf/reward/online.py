"""The online training loop: rlhf.feedback → RM steps → versions → checkpoints → offsets.

Runs on one thread of the reward service (it owns the Kafka consumer, which is not
thread-safe). Scoring never touches the weights being trained: every published version
is an independent copy, swapped in by replacing one reference (ServingSnapshot).

One iteration:
  1. poll feedback events
  2. de-duplicate by event id, turn them into pairs / ties / lone ratings; a superseding
     event retracts the one it replaces; events of quarantined raters are copied to the
     quarantine topic (rlhf.feedback.quarantine) and held, not trained
  3. train (progressive validation first), publishing a version every N steps
  4. checkpoint every M steps or T seconds, and when the topic runs dry; commit the
     offsets only after the checkpoint that contains their effect
Any failure restores the last checkpoint (weights, trainer state, offsets) and goes on.

An operator's release of a quarantined rater (`release_rater`, the ReleaseRater RPC) runs on
this thread between iterations: the rater's held examples and their events read back from
the quarantine topic are queued, and train in the next steps (with no new feedback too).

A lost log (the broker came back empty, the topic was recreated): the checkpoint stores the
identity of the log its offsets point into (EventConsumer.log_ids); on restore, or when the
consumer notices it while polling, the consumer reads the new log from its start. The
gateway's outbox re-sends every event the old log held, and the restored de-dup set drops
those already trained, so each accepted feedback event is trained exactly once.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from rlhf.bus import EventConsumer, EventProducer, Offsets, new_event, offsets_from_json, offsets_to_json
from rlhf.reward import metrics as m
from rlhf.reward.checkpoint import RewardCheckpoints
from rlhf.reward.config import LoopConfig
from rlhf.reward.data import Messages
from rlhf.reward.model import BackboneSpec, RewardModel
from rlhf.reward.normalizer import ScoreNormalizer
from rlhf.reward.trainer import OnlineRewardTrainer
from rlhf.tracking import Tracker
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSnapshot:
    """One RM version as Score serves it: weights, the normaliser of that version, its number;
    `info`: the version's manifest meta (online accuracy, pairs seen), which a scorer
    replica reports in GetInfo (the trainer reports its live numbers)."""

    model: RewardModel
    normalizer: ScoreNormalizer
    version: int
    train_step: int
    info: dict[str, Any] = field(default_factory=dict)

    def score(
        self, prompts: list[Messages], responses: list[str], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw (B,), normalised (B,))"""
        raw = self.model.score(prompts, responses, batch_size)
        return raw, self.normalizer.normalize(raw)

    def set_gauges(self, online_accuracy: float) -> None:
        """The served version's gauges: its number, its normaliser, the accuracy it is known by."""
        m.VERSION.set(self.version)
        m.SCORE_MEAN.set(self.normalizer.mean)
        m.SCORE_STD.set(self.normalizer.std)
        m.ACCURACY.set(online_accuracy)


class OnlineRewardLoop:
    def __init__(
        self,
        make_trainer: Callable[[], OnlineRewardTrainer],
        make_consumer: Callable[[], EventConsumer],
        producer: EventProducer | None,
        updates_topic: str,
        checkpoints: RewardCheckpoints,
        backbone: BackboneSpec,
        cfg: LoopConfig,
        on_swap: Callable[[ServingSnapshot], None],
        tracker: Tracker | None = None,
        quarantine_topic: str | None = None,
        read_quarantine: Callable[[str], Iterable[Any]] | None = None,
    ):
        """`read_quarantine(rater)`: that rater's Feedback events on the quarantine topic,
        from its start (what a release replays); None: a release trains the held examples only."""
        self.make_trainer, self.make_consumer = make_trainer, make_consumer
        self.producer, self.updates_topic = producer, updates_topic
        self.checkpoints, self.backbone, self.cfg, self.on_swap = checkpoints, backbone, cfg, on_swap
        self.tracker = tracker or Tracker(None, "reward")  # each step's stats (rlhf/tracking.py)
        self.quarantine_topic = quarantine_topic  # where quarantined raters' events are copied
        self.read_quarantine = read_quarantine
        self._requests: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()  # run on the loop thread
        self.trainer: OnlineRewardTrainer | None = None
        self.consumer: EventConsumer | None = None
        self.version = 0
        self._published_step = 0  # trainer step whose weights `version` holds
        self._saved_step = 0  # trainer step of the last checkpoint
        self._saved_at = time.monotonic()
        self._dirty = False  # state changed since the last checkpoint
        self._offsets: Offsets = {}  # positions the last checkpoint recorded

    # ---- start / recovery -------------------------------------------------------------

    def restore(self) -> None:
        """(Re)build trainer and consumer from the last checkpoint, or fresh; swap that version in."""
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        trainer = self.make_trainer()
        state = self.checkpoints.latest_state()
        offsets: Offsets = {}
        log_ids: dict[str, str] = {}
        version = 0
        if state is not None:
            version = state["version"]
            _, tensors = self.checkpoints.load_weights(version)
            trainer.model.load_state_dict(tensors)
            trainer.load_state_dict(state["trainer"])
            offsets = offsets_from_json(state["offsets"])
            log_ids = state.get("log_ids", {})  # absent in checkpoints from before log ids
        consumer = self.make_consumer()
        # Resume exactly after what the checkpoint trained on. The group's committed
        # offsets are never ahead of it (they are committed after the checkpoint), except
        # past duplicates, which the restored de-dup set drops again.
        mine = {tp: o for tp, o in offsets.items() if tp[0] == consumer.topic}
        if mine and consumer.seek(mine, log_ids=log_ids) is not None:
            # the offsets were in a lost log: forget them, the consumer reads the new one from its start
            offsets = {tp: o for tp, o in offsets.items() if tp[0] != consumer.topic}
            mine = consumer.positions()
        self.trainer, self.consumer, self.version = trainer, consumer, version
        self._published_step = self._saved_step = trainer.step
        self._saved_at, self._dirty, self._offsets = time.monotonic(), False, offsets
        self.tracker.rewind(trainer.step)  # steps past the checkpoint are trained again
        self._swap()
        log.info(
            "reward model restored",
            extra={
                "rm_version": version,
                "train_step": trainer.step,
                "offsets": {f"{t}/{p}": o for (t, p), o in mine.items()},
            },
        )

    @property
    def assigned(self) -> bool:
        return self.consumer is not None and self.consumer.assigned

    # ---- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.iterate()
            except Exception:
                log.exception("reward training iteration failed; restoring the last checkpoint")
                m.LOOP_ERRORS.inc()
                if stop.wait(self.cfg.error_backoff_seconds):
                    break
                try:
                    self.restore()
                except Exception:
                    log.exception("restore failed; retrying")
        if self.trainer is None or self.consumer is None:
            self.tracker.close()
            return  # never restored: nothing to save
        try:
            self.flush()
        except Exception:
            log.exception("final checkpoint failed; the next start replays from the last one")
        finally:
            self.consumer.close()
            self.tracker.close()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the training thread before its next poll (the trainer is not
        thread-safe); the future has its result or its exception."""
        future: Future = Future()
        self._requests.put((fn, future))
        return future

    def _run_requests(self) -> None:
        while True:
            try:
                fn, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller's answer, not the loop's failure
                    future.set_exception(e)

    def release_rater(self, rater: str) -> dict[str, Any]:
        """On the training thread: release `rater` (trusted again until they vote worse anew),
        queue their held examples and replay their events from the quarantine topic."""
        tr = self.trainer
        was = tr.reliability.is_quarantined(rater)
        released = tr.release(rater)
        replayed = (0, 0)
        if self.read_quarantine is not None:
            replayed = tr.replay(rater, self.read_quarantine(rater))
        self._dirty = True
        self.checkpoint()  # durable now: a failed iteration restores the released state, not the quarantine
        m.QUARANTINED_RATERS.set(len(tr.reliability.quarantined))
        for _rater, change, _p in tr.quarantine_changes:
            m.QUARANTINE_CHANGES.labels(change).inc()
        tr.quarantine_changes.clear()
        log.warning(
            "rater released by an operator",
            extra={
                "rater_id": rater,
                "was_quarantined": was,
                "examples": released,
                "replayed_events": replayed[0],
                "replayed_examples": replayed[1],
            },
        )
        return {
            "was_quarantined": was,
            "released_examples": released,
            "replayed_events": replayed[0],
            "replayed_examples": replayed[1],
        }

    def iterate(self) -> None:
        self._run_requests()
        if self.trainer.pending:  # released examples train now, new feedback or not
            for stats in self.trainer.train_released():
                self._record(stats)
                if self.trainer.step - self._published_step >= self.cfg.publish_every_steps:
                    self.publish()
        # 1. poll
        records = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records)
        if not records:
            if self.cfg.checkpoint_when_idle:
                self.flush()  # the topic ran dry: make everything so far durable
            return
        # 2. de-duplicate and convert
        ingested = self.trainer.ingest(r.event for r in records)
        for i, reason in ingested.refused:  # no training signal: to rlhf.feedback.dlq, with why
            self.consumer.dead_letter(records[i], reason)
        for i in ingested.quarantined:  # kept where an operator can read and replay them
            if self.producer is not None and self.quarantine_topic:
                r = records[i]
                self.producer.publish_bytes(
                    self.quarantine_topic,
                    r.value,
                    r.key,
                    {"quarantine.rater": r.event.rater_id.encode()},
                )
        m.QUARANTINED_EVENTS.inc(len(ingested.quarantined))
        m.RETRACTED.inc(ingested.retracted)
        for kind, n in ingested.kinds.items():
            m.FEEDBACK.labels(kind).inc(n)
        for reason, n in ingested.invalid.items():
            m.INVALID.labels(reason).inc(n)
        m.DUPLICATES.inc(ingested.duplicates)
        self._dirty |= ingested.duplicates < len(records)
        # 3. train, publishing versions on the way
        for stats in self.trainer.train(ingested.examples):
            self._record(stats)
            if self.trainer.step - self._published_step >= self.cfg.publish_every_steps:
                self.publish()
        # 4. checkpoint
        due = self.trainer.step - self._saved_step >= self.cfg.checkpoint_every_steps
        late = self._dirty and time.monotonic() - self._saved_at >= self.cfg.checkpoint_every_seconds
        if due or late:
            self.checkpoint()

    def _record(self, stats: dict[str, float]) -> None:
        m.TRAIN_STEPS.inc()
        m.LOSS.set(stats["loss"])
        m.ACCURACY.set(stats["online_accuracy"])
        m.GRAD_NORM.set(stats["grad_norm"])
        m.PAIRS.inc(stats["new_pairs"])
        m.POINTWISE.inc(stats["new_examples"] - stats["new_pairs"])
        m.REPLAYED.inc(stats["replayed"])
        m.REPLAY_SIZE.set(len(self.trainer.buffer))
        m.STEP_SECONDS.observe(stats["step_seconds"])
        m.QUARANTINED_RATERS.set(len(self.trainer.reliability.quarantined))
        m.RATER_WEIGHT.set(stats["mean_weight"])
        for rater, change, accuracy in self.trainer.quarantine_changes:
            m.QUARANTINE_CHANGES.labels(change).inc()
            log.warning(f"rater {change}", extra={"rater_id": rater, "accuracy": round(accuracy, 3)})
        self.trainer.quarantine_changes.clear()
        self.tracker.log(self.trainer.step, stats)
        log.debug("rm step", extra={"train_step": self.trainer.step, **stats})

    # ---- versions and checkpoints -------------------------------------------------------

    def publish(self) -> None:
        """Write the current weights as a new version, swap it in, announce it."""
        t0 = time.perf_counter()
        tr = self.trainer
        meta = {
            "train_step": tr.step,
            "online_accuracy": tr.online_accuracy,
            "pairs_seen": tr.pairs_seen,
            "examples_seen": tr.examples_seen,
            "score_mean": tr.normalizer.mean,
            "score_std": tr.normalizer.std,
            "normalizer": tr.normalizer.state_dict(),
            "backbone": self.backbone.name,
        }
        record = self.checkpoints.publish(tr.model.state_dict(), self.version, str(self.backbone.path), meta)
        self.version, self._published_step = record.version, tr.step
        self._swap()
        if self.producer is not None:
            update = new_event(
                events_pb2.RewardModelUpdate,
                version=record.version,
                train_step=tr.step,
                uri=record.path,
                sha256=record.sha256,
                online_accuracy=tr.online_accuracy,
                score_mean=tr.normalizer.mean,
                score_std=tr.normalizer.std,
                pairs_seen=tr.pairs_seen,
            )
            try:
                self.producer.publish(self.updates_topic, update, key="reward")
            except Exception:  # the version is served either way; Score responses carry it
                log.exception("announcing reward-model version failed", extra={"rm_version": record.version})
        m.PUBLISH_SECONDS.observe(time.perf_counter() - t0)
        log.info("reward model version", extra={**meta, "rm_version": record.version, "sha256": record.sha256})

    def checkpoint(self) -> None:
        """Trainer state (naming a version with these exact weights), then the offsets."""
        t0 = time.perf_counter()
        if self.trainer.step != self._published_step:
            self.publish()
        offsets = {**self._offsets, **self.consumer.positions()}
        state: dict[str, Any] = {
            "trainer": self.trainer.state_dict(),
            "offsets": offsets_to_json(offsets),
            "log_ids": self.consumer.log_ids(),
        }
        self.checkpoints.save_state(self.trainer.step, self.version, state)
        self.consumer.commit({tp: o for tp, o in offsets.items() if tp[0] == self.consumer.topic})
        self._saved_step, self._saved_at, self._dirty, self._offsets = (
            self.trainer.step,
            time.monotonic(),
            False,
            offsets,
        )
        m.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
        log.info(
            "reward checkpoint",
            extra={
                "train_step": self.trainer.step,
                "rm_version": self.version,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )

    def flush(self) -> None:
        """Checkpoint unsaved progress; with none, just commit past duplicates."""
        if self._dirty or self.trainer.step != self._saved_step:
            self.checkpoint()
            return
        positions = self.consumer.positions()
        if any(self._offsets.get(tp) != o for tp, o in positions.items()):
            self._offsets.update(positions)
            self.consumer.commit(positions)

    def _swap(self) -> None:
        tr = self.trainer
        snapshot = ServingSnapshot(tr.model.clone().eval(), copy.deepcopy(tr.normalizer), self.version, tr.step)
        self.on_swap(snapshot)
        snapshot.set_gauges(tr.online_accuracy)


def read_quarantined(bootstrap: str, topic: str, rater: str, timeout_s: float = 60.0) -> list[Any]:
    """`rater`'s Feedback events on the quarantine topic (header `quarantine.rater`), from
    its start to its end as of now, in order; what a release replays. Reads with no
    consumer group, so nothing is committed and the topic stays as it was."""
    from kafka import KafkaConsumer, TopicPartition

    from rlhf.bus.codec import DecodeError, decode

    want = rater.encode()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout_s:g}s")
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if dict(r.headers or ()).get("quarantine.rater") != want:
                        continue
                    try:
                        out.append(decode(events_pb2.Feedback, r.value))
                    except DecodeError:
                        log.warning("undecodable event on the quarantine topic", extra={"offset": r.offset})
        return out
    finally:
        consumer.close()
