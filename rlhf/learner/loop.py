"""The learner process: Kafka rollouts in, PPO steps, checkpoints, gated policy versions out.

One thread runs `Learner.run`; the gRPC control plane talks to it through thread-safe
methods (status, pause, resume, versions, rollback). Each iteration of the loop:

  1. poll Rollout events; drop malformed ones and ones more than max_policy_lag
     versions behind the current weights (counted)
  2. once batch_size fresh rollouts are buffered, one PPO step on the oldest of them
  3. ledger line (event ids trained and dropped), then a checkpoint holding the Kafka
     offsets below which everything is handled, then the Kafka commit of those offsets
  4. every publish_every steps a new version: drift gate, weight store, PolicyUpdate

Exactly-once training under SIGKILL: the checkpoint is the source of truth. Restarting
loads it, seeks the consumer to its offsets and cuts the ledger back to its step, so a
rollout is in the restored model's history exactly once, whatever moment the kill hit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.learner import metrics
from rlhf.learner.batch import collate
from rlhf.learner.checkpoint import CheckpointStore, Ledger, offsets_to_json
from rlhf.learner.config import LearnerConfig
from rlhf.learner.drift import DEFAULT_HELDOUT_PROMPTS, DriftGate
from rlhf.learner.intake import LearnerState, RolloutIntake
from rlhf.learner.policy import build_policy
from rlhf.learner.trainer import PPOTrainer
from rlhf.learner.versions import version_info, weight_format_proto
from rlhf.weightstore import CorruptWeights, VersionRecord, WeightStore

log = logging.getLogger(__name__)

class LearnerError(Exception):
    """A control-plane request that cannot be done; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Learner:
    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str | Path,
        state_dir: str | Path,
        bootstrap: str,
        topic_prefix: str = "rlhf",
    ):
        from rlhf.bus import Topics

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.state_dir = Path(state_dir)
        self.bootstrap = bootstrap
        self.topics = Topics(topic_prefix)
        self.weights_dir = Path(cfg.weight_store_dir) if cfg.weight_store_dir else self.state_dir / "weights"
        self.state = LearnerState()
        self.last_stats: dict[str, float] = {}
        self.paused = threading.Event()
        self._lock = threading.Lock()  # guards state/last_stats reads from the gRPC threads
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self.intake: RolloutIntake | None = None  # made by _recover, around the restored state
        self._loop_thread: threading.Thread | None = None
        self.consumer = self.producer = None

    # --- start-up and recovery ---------------------------------------------------------

    def start(self) -> None:
        """Load the model, restore the latest checkpoint, connect to Kafka (blocking)."""
        from rlhf.bus import EventConsumer, EventProducer, ensure_topics
        from rlhf.models import chat_prompt_ids, load_tokenizer
        from rlhf.v1 import events_pb2

        cfg = self.cfg
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.policy = build_policy(self.model_dir, cfg, device)
        self.trainer = PPOTrainer(self.policy, cfg)
        prompts = (
            [line.strip() for line in Path(cfg.drift_prompts_file).read_text().splitlines() if line.strip()]
            if cfg.drift_prompts_file else list(DEFAULT_HELDOUT_PROMPTS)
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

        ensure_topics(self.bootstrap, [self.topics.rollouts, self.topics.dlq(self.topics.rollouts),
                                       self.topics.policy_updates])
        self.producer = EventProducer(self.bootstrap, client_id="learner")
        self.consumer = EventConsumer(
            self.bootstrap, self.topics.rollouts, events_pb2.Rollout, cfg.group_id, dlq_producer=self.producer
        )
        self._recover()

    def _recover(self) -> None:
        folder = self.checkpoints.latest()
        if folder is not None:
            meta = CheckpointStore.load(folder, self.policy, self.trainer)
            self.state = LearnerState.from_json(meta["state"])
            self.last_stats = meta.get("last_stats", {})
            self.consumer.seek(self.state.offsets)
            log.info("restored checkpoint", extra={"checkpoint": folder.name, "step": self.state.step,
                                                  "version": self.state.version})
        else:
            latest = self.store.latest()
            if latest is not None:  # a store that outlived its checkpoints: keep numbers unique
                self.state.version = latest.version
            if not any(r.version == 0 for r in self.store.versions()):
                self._store_version(0, parent=0, meta={"step": 0, "promoted": True, "kl_to_reference": 0.0,
                                                       "kl_budget": self.cfg.drift_kl_budget,
                                                       "reason": "initial policy"})
        self.intake = RolloutIntake(self.state, self.cfg.batch_size, self.cfg.max_policy_lag)
        cut = self.ledger.truncate_after(self.state.step)
        if cut:
            log.info("ledger cut back to the checkpoint", extra={"entries_removed": cut})
        if self.state.pending_publish is not None:
            log.info("finishing an interrupted publication", extra={"version": self.state.pending_publish})
            self._publish(self.state.pending_publish)
        self._export_gauges()

    # --- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Train until `stop` is set. Control-plane commands run between steps."""
        self._loop_thread = threading.current_thread()
        try:
            while not stop.is_set():
                self._run_commands()
                if self.paused.is_set():
                    stop.wait(0.1)
                    continue
                if len(self.intake) < self.cfg.max_buffered_rollouts:
                    wait_ms = 0 if len(self.intake) >= self.cfg.batch_size else 200
                    self.intake.add(self.consumer.poll(timeout_ms=wait_ms, max_records=self.cfg.batch_size * 4))
                records = self.intake.take_batch()
                if records:
                    self._train(records)
        finally:
            self._loop_thread = None
            self._run_commands()  # fail nobody waiting: run what is queued

    def _train(self, records: list) -> None:
        cfg, state = self.cfg, self.state
        # 1. the PPO step
        events = [r.event for r in records]
        lags = [state.lag(e.policy_version) for e in events]
        stats = self.trainer.step(collate(events, self.pad_id))
        stats["staleness_mean"] = sum(lags) / len(lags)
        stats["staleness_max"] = float(max(lags))

        # 2. bookkeeping: step, maybe a new version
        with self._lock:
            state.step += 1
            state.rollouts_trained += len(records)
            state.steps_since_version += 1
            if state.steps_since_version >= cfg.publish_every:
                state.pending_publish = state.new_version()
            state.offsets = self.intake.safe_offsets()
            self.last_stats = stats
        metrics.ROLLOUTS_TRAINED.inc(len(records))
        metrics.observe_step(stats)

        # 3. ledger, checkpoint, then the Kafka commit the checkpoint covers
        self.ledger.append({
            "step": state.step,
            "version": state.lineage[-1],
            "trained": [e.event_id for e in events],
            **self.intake.pop_dropped(),
            "offsets": offsets_to_json(state.offsets),
        })
        if state.step % cfg.checkpoint_every == 0 or state.pending_publish is not None:
            self._checkpoint()
        log.info("ppo step", extra={"step": state.step, "version": state.lineage[-1],
                                     **{k: round(v, 5) for k, v in stats.items()}})

        # 4. the new version, if one is due
        if state.pending_publish is not None:
            self._publish(state.pending_publish)
        self._export_gauges()

    def _checkpoint(self) -> None:
        start = time.perf_counter()
        with self._lock:
            meta = {"state": self.state.to_json(), "last_stats": self.last_stats,
                    "config": self.cfg.model_dump(mode="json"), "base_model": str(self.model_dir)}
        self.checkpoints.save(self.state.step, self.policy, self.trainer, meta)
        self.consumer.commit(self.state.offsets)
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
        except CorruptWeights:
            result = self.gate.check(self.policy)
            metrics.DRIFT_KL.set(result.kl)
            parent = state.lineage[-2] if len(state.lineage) > 1 else 0
            record = self._store_version(version, parent, {
                "step": state.step, "promoted": result.passed, "kl_to_reference": result.kl,
                "kl_budget": result.budget, "reason": result.reason,
            })
            metrics.VERSIONS_PUBLISHED.inc()
        promoted = bool(record.meta.get("promoted"))
        action = events_pb2.POLICY_ACTION_PROMOTED if promoted else events_pb2.POLICY_ACTION_REJECTED
        self.producer.publish(self.topics.policy_updates, self._update_event(record, action), key="policy")
        with self._lock:
            if promoted:
                state.serving_version = version
            else:
                metrics.DRIFT_REJECTIONS.inc()
                log.warning("drift gate rejected a version", extra={"version": version,
                                                                   "reason": record.meta.get("reason")})
                if self.cfg.on_reject == "revert":
                    self._switch_weights(state.serving_version)
            state.pending_publish = None

    def _update_event(self, record: VersionRecord, action: int, reason: str | None = None):
        from rlhf.bus import new_event
        from rlhf.v1 import events_pb2

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
        )

    def _switch_weights(self, version: int) -> None:
        """Make the training weights those of a stored version (revert or rollback)."""
        _, tensors = self.store.load(version)
        self.policy.load_policy_state_dict({k: v.to(self.policy.device) for k, v in tensors.items()})
        self.trainer.reset_optimizer()
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
                "last_stats": dict(self.last_stats),
            }

    def pause(self) -> None:
        self.paused.set()
        metrics.PAUSED.set(1)

    def resume(self) -> None:
        self.paused.clear()
        metrics.PAUSED.set(0)

    def versions(self) -> list:
        return [version_info(r) for r in self.store.versions()]

    def rollback(self, version: int, timeout: float = 600.0):
        """Serve (and train on from) an earlier promoted version; returns its PolicyVersionInfo."""
        return self._call_in_loop(lambda: self._rollback(version), timeout)

    def _rollback(self, version: int):
        from rlhf.v1 import events_pb2

        try:
            record = self.store.get(version)
        except CorruptWeights:
            raise LearnerError("NOT_FOUND", f"version {version} is not in the weight store") from None
        if not record.meta.get("promoted"):
            raise LearnerError(
                "FAILED_PRECONDITION",
                f"version {version} was never promoted ({record.meta.get('reason') or 'rejected'}); "
                "roll back to a promoted version (see ListVersions)",
            )
        with self._lock:
            self._switch_weights(version)
            self.state.serving_version = version
            self.state.pending_publish = None
        self._checkpoint()
        event = self._update_event(record, events_pb2.POLICY_ACTION_ROLLED_BACK, reason="operator rollback")
        self.producer.publish(self.topics.policy_updates, event, key="policy")
        metrics.ROLLBACKS.inc()
        self._export_gauges()
        log.warning("rolled back", extra={"version": version})
        return version_info(record)

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

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if self.producer is not None:
            self.producer.close()
