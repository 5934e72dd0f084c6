"""Follows `PolicyUpdate` events on Kafka and loads the versions a generator should serve.

Every generator replica must see every update, so each reads the whole topic under its own
never-committed consumer group: on start it replays the topic (a few events per version) and
loads the last PROMOTED or ROLLED_BACK version, then follows new events. PROMOTED loads a
version newer than the one serving; ROLLED_BACK loads its version whatever it is; REJECTED is
ignored. A refused or failed load is logged and counted; the old version keeps serving.

An event is only as good as what it says: a PROMOTED / ROLLED_BACK event is checked before
it is believed (`check`), and ignored with a counted (`rlhf_generator_policy_events_invalid_total
{reason}`), logged reason when its version is negative, not in the weight store, not promoted
there, or when its sha256 or format is not the manifest's. Without a weight store (a remote
generator fed by UpdateWeights) a well-formed announcement (version ≥ 0, 64-hex sha256) is
recorded as the lineage UpdateWeights checks against (`Generator.announced`). The event's
`uri` (the learner's path) is not followed: a generator reads its own store by version.

Canaries (issue 15): a learner that runs them states the whole serving state in every event
(`stable_version`, `candidate_version`, `canary_share`; all 0 = an old-style event), and the
served set follows it (`_follow`): CANARY loads its version as the candidate beside the
stable one; PROMOTED naming the candidate as stable promotes it without a reload; an event
whose candidate is 0 drops the candidate; a stable version that differs from the one
serving is loaded. `catch_up` replays to the last such event and reaches the same state.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from prometheus_client import Counter

from rlhf.bus import EventConsumer, Topics, ensure_topics
from rlhf.generation.generator import Generator
from rlhf.generation.types import WeightsRefused
from rlhf.generation.weights import FULL, LORA, Announced
from rlhf.v1 import common_pb2, events_pb2
from rlhf.weightstore import BadManifest, UnknownVersion

log = logging.getLogger(__name__)

POLICY_EVENTS = Counter(
    "rlhf_generator_policy_events_total", "PolicyUpdate events seen, by action and outcome", ["action", "outcome"]
)
INVALID_EVENTS = Counter(
    "rlhf_generator_policy_events_invalid_total",
    "PROMOTED/ROLLED_BACK events ignored because what they say is wrong, by reason "
    "(negative_version, bad_sha256, not_in_store, bad_manifest, not_promoted, sha256_mismatch, "
    "format_mismatch)",
    ["reason"],
)

PROMOTED, ROLLED_BACK = events_pb2.POLICY_ACTION_PROMOTED, events_pb2.POLICY_ACTION_ROLLED_BACK
CANARY = events_pb2.POLICY_ACTION_CANARY
SERVING = (PROMOTED, ROLLED_BACK, CANARY)  # the actions that change what is served
_FORMATS = {common_pb2.WEIGHT_FORMAT_FULL: FULL, common_pb2.WEIGHT_FORMAT_LORA: LORA}


class PolicyFollower:
    def __init__(self, generator: Generator, bootstrap: str, topic: str, name: str = "generator"):
        self.gen = generator
        self.bootstrap, self.topic = bootstrap, topic
        self.group_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.consumer: EventConsumer | None = None

    async def catch_up(self) -> None:
        """Assign the topic, replay it to its end, and serve the last version it settles on."""
        await asyncio.to_thread(ensure_topics, self.bootstrap, [self.topic, Topics.dlq(self.topic)])
        self.consumer = await asyncio.to_thread(
            EventConsumer, self.bootstrap, self.topic, events_pb2.PolicyUpdate, self.group_id, mode="assign"
        )
        last = None
        while True:
            records = await asyncio.to_thread(self.consumer.poll, 500)
            for r in records:
                if r.event.action in SERVING and await self._valid(r.event):
                    last = r.event
            if not records and sum((await asyncio.to_thread(self.consumer.lag)).values()) == 0:
                break
        if last is None or not self.gen.store.root.is_dir():
            return
        if has_canary_state(last):
            await self._follow(last, replay=True)
        elif last.action != CANARY and (last.version != self.gen.version or self.gen.candidate_version):
            await self._load(last, replay=True)

    async def run(self) -> None:
        """Follow new events until cancelled; a broker outage is logged and waited out."""
        while True:
            try:
                records = await asyncio.to_thread(self.consumer.poll, 1000)
            except Exception:
                log.exception("polling policy updates failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for r in records:
                ev = r.event
                if ev.action not in SERVING or not await self._valid(ev):
                    continue
                if not self.gen.store.root.is_dir():
                    POLICY_EVENTS.labels(events_pb2.PolicyAction.Name(ev.action), "announced").inc()
                elif has_canary_state(ev):
                    await self._follow(ev)
                elif ev.action == CANARY:  # a candidate must say what it is served beside
                    POLICY_EVENTS.labels("POLICY_ACTION_CANARY", "invalid").inc()
                    log.error("CANARY event without a serving state ignored", extra={"version": ev.version})
                elif ev.action == ROLLED_BACK or ev.version > self.gen.version:
                    await self._load(ev)
                else:
                    POLICY_EVENTS.labels(events_pb2.PolicyAction.Name(ev.action), "ignored").inc()

    async def _valid(self, ev: events_pb2.PolicyUpdate) -> bool:
        """Whether to believe a PROMOTED / ROLLED_BACK event; if not, count and log why."""
        bad = await asyncio.to_thread(self.check, ev)
        if bad is None:
            return True
        reason, detail = bad
        action = events_pb2.PolicyAction.Name(ev.action)
        INVALID_EVENTS.labels(reason).inc()
        POLICY_EVENTS.labels(action, "invalid").inc()
        log.error(
            "policy update ignored",
            extra={
                "version": ev.version,
                "action": action,
                "reason": reason,
                "detail": detail,
                "event_id": ev.event_id,
            },
        )
        return False

    def check(self, ev: events_pb2.PolicyUpdate) -> tuple[str, str] | None:
        """(reason, detail) if the event says something false, else None (and, without a
        weight store, the version joins the announced lineage)."""
        fmt = _FORMATS.get(ev.format, "")
        if ev.version < 0:
            return "negative_version", f"version {ev.version}"
        store = self.gen.store
        if not store.root.is_dir():
            if len(ev.sha256) != 64 or any(c not in "0123456789abcdef" for c in ev.sha256.lower()):
                return "bad_sha256", "an announcement without a 64-hex sha256 cannot be checked"
            self.gen.announced[ev.version] = Announced(ev.sha256.lower(), fmt)
            return None
        try:
            record = store.get(ev.version)
        except UnknownVersion as e:
            # version 0 without a store entry: the weights the generator started with
            return None if ev.version == 0 else ("not_in_store", str(e))
        except BadManifest as e:
            return "bad_manifest", str(e)
        if not record.promoted:
            return "not_promoted", f"the store's manifest of version {ev.version} is not promoted"
        if ev.sha256.lower() != record.sha256:
            return "sha256_mismatch", f"event {ev.sha256[:16] or '(none)'}…, manifest {record.sha256[:16]}…"
        if fmt and fmt != record.format:
            return "format_mismatch", f"event {fmt!r}, manifest {record.format!r}"
        return None

    async def _follow(self, ev: events_pb2.PolicyUpdate, replay: bool = False) -> None:
        """Serve what a canary-state event says: stable `stable_version`, candidate
        `candidate_version` (0: none), share `canary_share`. A failed step is logged and
        counted; the steps after it still run (a refused candidate leaves the stable serving)."""
        action = events_pb2.PolicyAction.Name(ev.action)
        gen = self.gen
        stable, candidate = ev.stable_version, ev.candidate_version
        gen.set_canary_share(ev.canary_share)

        def sha(version: int) -> str:
            return ev.sha256 if version == ev.version else ""  # the manifest's is checked anyway

        def fmt(version: int) -> str:
            return _FORMATS.get(ev.format, "") if version == ev.version else ""

        steps = []
        if gen.candidate_version and gen.candidate_version not in (stable, candidate):
            steps.append(("drop", lambda: gen.drop_candidate(f"{action}: candidate {candidate or 'none'}")))
        if stable != gen.version:
            if stable == gen.candidate_version:
                steps.append(("promote", gen.promote_candidate))
            else:
                steps.append(("load", lambda: gen.load_version(stable, "", sha(stable), fmt(stable))))
        outcome = "loaded"
        for what, step in steps:
            outcome = "failed" if not await self._step(ev, what, step) else outcome
        if candidate and candidate != gen.candidate_version and candidate != gen.version:
            load = gen.load_candidate(candidate, sha(candidate), fmt(candidate))
            outcome = "failed" if not await self._step(ev, "candidate", lambda: load) else outcome
        elif not candidate and gen.candidate_version:
            await gen.drop_candidate(f"{action}: no candidate")
        POLICY_EVENTS.labels(action, outcome).inc()
        log.info(
            "policy update followed",
            extra={
                "action": action,
                "stable_version": gen.version,
                "candidate_version": gen.candidate_version,
                "canary_share": gen.canary_share,
                "replay": replay,
            },
        )

    async def _step(self, ev: events_pb2.PolicyUpdate, what: str, step) -> bool:
        try:
            await step()
        except WeightsRefused as e:
            log.error(
                "policy update refused",
                extra={"version": ev.version, "step": what, "reason": str(e), "event_id": ev.event_id},
            )
            return False
        except Exception:
            log.exception("policy update failed", extra={"version": ev.version, "step": what})
            return False
        return True

    async def _load(self, ev: events_pb2.PolicyUpdate, replay: bool = False) -> None:
        action = events_pb2.PolicyAction.Name(ev.action)
        try:
            await self.gen.drop_candidate(f"{action} of version {ev.version} without canary state")
            await self.gen.load_version(ev.version, "", ev.sha256, _FORMATS.get(ev.format, ""))
        except WeightsRefused as e:
            POLICY_EVENTS.labels(action, "refused").inc()
            log.error("policy update refused", extra={"version": ev.version, "reason": str(e)})
            return
        except Exception:
            POLICY_EVENTS.labels(action, "failed").inc()
            log.exception("policy update failed", extra={"version": ev.version})
            return
        POLICY_EVENTS.labels(action, "loaded").inc()
        log.info("policy update loaded", extra={"version": ev.version, "action": action, "replay": replay})

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def has_canary_state(ev: events_pb2.PolicyUpdate) -> bool:
    """Whether the event states the serving state in full (a learner that runs canaries)."""
    return bool(ev.stable_version or ev.candidate_version or ev.canary_share)
