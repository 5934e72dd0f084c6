"""A scorer replica of the reward service (`RLHF_REWARD_ROLE=scorer`): Score only, with the
newest reward-model version the trainer wrote to the reward store.

Scoring is a gRPC call (the rollout worker scores each group; the gateway ranks compare
candidates), so scorers scale the way generators do: any number of replicas behind one
`dns:///` address (round_robin), each following every version. A scorer trains nothing and
writes nothing: no feedback consumer, no writer lock, no checkpoint.

Which version: at start, the newest complete version in the store (version 0, the seeded
fresh head the trainer also starts from, while the store is empty); after that, each
RewardModelUpdate announced on rlhf.reward-updates that is newer than the one serving, and
— in case an announcement did not go out (the trainer serves a version either way) — the
store's newest version, looked up every `follow_seconds`. Every replica must see every
announcement, so each reads the whole topic under a consumer group of its own and never
commits. An announcement is checked before it is believed: a version the store does not
hold, or whose sha256 is not the manifest's, is ignored with a counted, logged reason, and
so is a version whose bytes do not match its manifest; the version serving keeps serving.

Thread-safe the way the trainer's loop is: `run` is one thread (it owns the consumer), and
the servicer reads `snapshot` through `on_swap`, one reference assignment per version.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable

from prometheus_client import Counter

from rlhf.reward.model import RewardModel
from rlhf.reward.normalizer import ScoreNormalizer
from rlhf.reward.online import ServingSnapshot
from rlhf.weightstore import CorruptWeights, UnknownVersion, WeightStore

log = logging.getLogger(__name__)

LOADS = Counter(
    "rlhf_reward_scorer_loads_total",
    "Reward-model versions a scorer replica swapped in, or failed to, by trigger (start, announcement, store) "
    "and outcome (loaded, failed)",
    ["trigger", "outcome"],
)
INVALID = Counter(
    "rlhf_reward_scorer_updates_invalid_total",
    "RewardModelUpdate announcements a scorer ignored because what they say is wrong, by reason "
    "(not_in_store, bad_manifest, sha256_mismatch)",
    ["reason"],
)


class RewardFollower:
    def __init__(
        self,
        store: WeightStore,
        base: RewardModel,
        normalizer: Callable[[], ScoreNormalizer],
        make_consumer: Callable[[str], object],
        on_swap: Callable[[ServingSnapshot], None],
        follow_seconds: float = 30.0,
    ):
        """`base`: the RM as the trainer builds it fresh (same backbone and head seed), into
        which each version's weights load; `normalizer()`: version 0's fresh normaliser;
        `make_consumer(group_id)`: an assigned EventConsumer of rlhf.reward-updates."""
        self.store, self.base, self.normalizer = store, base, normalizer
        self.make_consumer, self.on_swap, self.follow_seconds = make_consumer, on_swap, follow_seconds
        self.group_id = f"reward-scorer-{uuid.uuid4().hex[:8]}"
        self.consumer = None
        self.version = -1  # nothing served yet

    def start(self) -> None:
        """Serve the store's newest version (or version 0), then assign the announcements."""
        latest = self._latest()
        if latest is None or not self._load(latest, "", "start"):
            self._swap(self.base.clone().eval(), self.normalizer(), 0, {})
            log.info(
                "reward scorer serving version 0 (the store holds no version yet)",
                extra={"store": str(self.store.root)},
            )
        self.consumer = self.make_consumer(self.group_id)

    def run(self, stop: threading.Event) -> None:
        """Follow announcements (and the store) until `stop`; a broker outage is logged and waited out."""
        next_look = time.monotonic() + self.follow_seconds
        while not stop.is_set():
            try:
                records = self.consumer.poll(timeout_ms=500)
            except Exception:  # noqa: BLE001 - the store is still looked at; the next poll retries
                log.exception("polling reward-model announcements failed; retrying")
                stop.wait(1.0)
                records = []
            for r in records:
                self.on_update(r.event)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + self.follow_seconds
                latest = self._latest()
                if latest is not None and latest > self.version:
                    self._load(latest, "", "store")

    def on_update(self, ev) -> None:
        """One RewardModelUpdate: load its version if newer than the one serving and true."""
        if ev.version <= self.version:
            return
        try:
            record = self.store.get(ev.version)
        except UnknownVersion as e:
            return self._invalid(ev, "not_in_store", str(e))
        except CorruptWeights as e:
            return self._invalid(ev, "bad_manifest", str(e))
        if ev.sha256.lower() != record.sha256:
            return self._invalid(
                ev, "sha256_mismatch", f"event {ev.sha256[:16] or '(none)'}…, manifest {record.sha256[:16]}…"
            )
        self._load(ev.version, record.sha256, "announcement")

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()

    def _latest(self) -> int | None:
        try:
            latest = self.store.latest()
        except CorruptWeights:
            log.exception("reading the reward store failed", extra={"store": str(self.store.root)})
            return None
        return None if latest is None else latest.version

    def _load(self, version: int, sha256: str, trigger: str) -> bool:
        try:
            record, tensors = self.store.load(version, sha256)
            model = self.base.clone()
            model.load_state_dict(tensors)
            normalizer = ScoreNormalizer.from_state(record.meta["normalizer"])
        except Exception:  # noqa: BLE001 - a version that cannot load leaves the old one serving
            LOADS.labels(trigger, "failed").inc()
            log.exception(
                "reward-model version failed to load; the old one keeps serving", extra={"rm_version": version}
            )
            return False
        self._swap(model.eval(), normalizer, version, record.meta)
        LOADS.labels(trigger, "loaded").inc()
        log.info("reward scorer serving a new version", extra={"rm_version": version, "trigger": trigger})
        return True

    def _swap(self, model: RewardModel, normalizer: ScoreNormalizer, version: int, meta: dict) -> None:
        self.version = version
        snapshot = ServingSnapshot(model, normalizer, version, int(meta.get("train_step", 0)), info=meta)
        self.on_swap(snapshot)
        snapshot.set_gauges(float(meta.get("online_accuracy", 0.0)))

    def _invalid(self, ev, reason: str, detail: str) -> None:
        INVALID.labels(reason).inc()
        log.error(
            "reward-model announcement ignored",
            extra={"rm_version": ev.version, "reason": reason, "detail": detail, "event_id": ev.event_id},
        )
