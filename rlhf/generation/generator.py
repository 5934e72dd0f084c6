"""The generator: a backend, the version gate, request validation and weight swaps.

Versions: the weights the service starts with are version 0; every later version comes from
the weight store (`load_version`) or a gRPC stream (`receive`), and must be one the learner
published (`rlhf.generation.weights.published`: promoted in the store, or announced when this
generator has no store). A LoRA version is an adapter on the initial weights, the model the
learner trains its adapter against: loading one after a full version first restores the
initial weights (in the same drained swap).

During a canary (issue 15) a *candidate* is served beside the stable version
(`load_candidate`): a request names it by number (`generate(version=...)`), everything
else runs the stable version. The candidate is a LoRA adapter on the initial weights, loaded
without draining the stable version's requests (vLLM: one more LoRARequest; transformers:
a per-row adapter, rlhf/generation/adapters.py); `promote_candidate` makes it the stable
version (no reload), `drop_candidate` ends it. A full-weight candidate is a second model
copy (transformers, where memory permits; vLLM refuses it); a LoRA candidate while the
stable version is a full one (other base weights) is refused with one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import time
from contextlib import aclosing
from pathlib import Path
from typing import AsyncIterator

from rlhf.generation.backend import Backend
from rlhf.generation.gate import NotServed, Served, VersionGate
from rlhf.generation.metrics import (
    FINISHED,
    POLICY_VERSION,
    REQUESTS_IN_FLIGHT,
    TOKENS,
    WEIGHT_SYNC_SECONDS,
    WEIGHT_UPDATES,
)
from rlhf.generation.params import Limits, check_messages, check_prompt_ids
from rlhf.generation.types import Delta, NotPublished, Sampling, WeightsRefused
from rlhf.generation.weights import (
    FULL,
    LORA,
    Announced,
    WeightUpdate,
    check_full,
    check_lora,
    max_update_bytes,
    published,
    receive_stream,
    safetensors_files,
    store_version,
    tensor_shapes,
    update_from_folder,
    verify_sha256,
)
from rlhf.models import chat_prompt_ids, load_tokenizer
from rlhf.weightstore import WeightStore

log = logging.getLogger(__name__)

KEEP_RECEIVED = 3  # streamed versions kept on disk (a LoRA folder is read while it serves)


class Generator:
    def __init__(
        self,
        backend: Backend,
        model_dir: Path,
        limits: Limits,
        weight_store: Path,
        work_dir: Path,
        max_lora_rank: int = 16,
        model_name: str = "",
    ):
        self.backend = backend
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.limits = limits
        self.store = WeightStore(weight_store)
        self.work_dir = Path(work_dir)
        self.max_lora_rank = max_lora_rank
        self.gate = VersionGate(Served(0, FULL))
        self._swap_lock = asyncio.Lock()
        self._full_version = 0  # the full weights loaded now (under any LoRA adapter)
        self._retiring: set[asyncio.Task] = set()  # candidates waiting for their last request to end
        self.ready = False
        self._received: list[Path] = []
        # PROMOTED / ROLLED_BACK versions the PolicyUpdate follower saw: the lineage of a
        # generator without a weight store (weights.published)
        self.announced: dict[int, Announced] = {}

    async def start(self) -> None:
        self.tokenizer = load_tokenizer(self.model_dir)
        self.base_files = safetensors_files(self.model_dir)
        self.base_shapes = tensor_shapes(self.base_files)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.limits = dataclasses.replace(self.limits, vocab_size=int(config.get("vocab_size", len(self.tokenizer))))
        await self.backend.start()
        self.ready = True
        POLICY_VERSION.set(0)
        log.info("model loaded", extra={"model": str(self.model_dir), "backend": self.backend.name})

    async def stop(self) -> None:
        await self.backend.stop()

    @property
    def version(self) -> int:
        return self.gate.current.version

    @property
    def fmt(self) -> str:
        return self.gate.current.fmt

    @property
    def candidate_version(self) -> int:
        """The canary's candidate served beside the stable version; 0 when none."""
        c = self.gate.candidate
        return c.version if c is not None else 0

    @property
    def canary_share(self) -> float:
        """Share of new conversations the gateway sends the candidate (as the learner said)."""
        return self.gate.canary_share if self.gate.candidate is not None else 0.0

    def set_canary_share(self, share: float) -> None:
        self.gate.canary_share = float(share)

    # --- generation -------------------------------------------------------------------

    def chat_ids(self, messages: list[dict]) -> list[int]:
        check_messages(messages)
        return chat_prompt_ids(self.tokenizer, messages)

    def check_ids(self, ids: list[int]) -> list[int]:
        check_prompt_ids(ids, self.limits)
        return ids

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        stream: bool = True,
        version: int = 0,
    ) -> AsyncIterator[tuple[int, Delta]]:
        """(policy version, delta) pairs; the version is the same for the whole request:
        `version` (0: the stable one) if it is served, else `NotServed` before any delta.
        Callers must close the iterator (`contextlib.aclosing`) so the lease ends with them."""
        async with self.gate.lease(version) as served:
            REQUESTS_IN_FLIGHT.inc()
            TOKENS.labels("prompt").inc(len(prompt_ids))
            unfinished = sampling.n
            ended = "cancelled"  # what the samples still open at the end count as
            try:
                async with aclosing(
                    self.backend.generate(prompt_ids, sampling, request_id, served.handle, stream)
                ) as deltas:
                    async for d in deltas:
                        TOKENS.labels("completion").inc(len(d.token_ids))
                        if d.finish_reason:
                            FINISHED.labels(d.finish_reason).inc()
                            unfinished -= 1
                        yield served.version, d
            except Exception:
                ended = "error"
                raise
            finally:
                REQUESTS_IN_FLIGHT.dec()
                if unfinished > 0:  # the caller left (closed the iterator, was cancelled) or the engine failed
                    FINISHED.labels(ended).inc(unfinished)

    # --- weights ----------------------------------------------------------------------

    async def load_version(self, version: int, uri: str = "", sha256: str = "", fmt: str = "") -> float:
        """Serve weight-store `version` (0 without a store entry = the initial weights).
        `fmt`, when given, must match the version's manifest."""
        if version == 0 and not uri and not (self.store.folder(0) / "manifest.json").exists():
            return await self._swap(WeightUpdate(0, FULL, self.base_files))
        update = await asyncio.to_thread(store_version, self.store, version, uri, sha256)
        if fmt and fmt != update.fmt:
            raise WeightsRefused(f"format: version {version} is stored as {update.fmt!r}, the request says {fmt!r}")
        return await self._swap(update)

    async def receive(
        self,
        version: int,
        fmt: str,
        sha256: str,
        total_bytes: int,
        adapter_config_json: str,
        data: AsyncIterator[bytes],
    ) -> float:
        """Serve a version streamed over gRPC (bytes of one safetensors file). Before a byte
        is written: the header's total_bytes is within the size of the model it replaces, and
        (version, sha256, format) is what the learner published."""
        try:
            limit = max_update_bytes(fmt, self.base_shapes, adapter_config_json, self.max_lora_rank)
            want_sha, want_fmt = await asyncio.to_thread(published, self.store, version, self.announced)
            if want_fmt and want_fmt != fmt:
                raise NotPublished(f"header.format: version {version} was published as {want_fmt!r}, not {fmt!r}")
            if not sha256 or sha256.lower() != want_sha.lower():
                raise NotPublished(
                    f"header.sha256: {sha256[:16] or '(none)'}… is not the sha256 the learner "
                    f"published for version {version} ({want_sha[:16]}…)"
                )
            folder = await receive_stream(
                version,
                fmt,
                sha256,
                total_bytes,
                adapter_config_json,
                data,
                self.work_dir / "received",
                max_bytes=limit,
            )
        except WeightsRefused as e:
            WEIGHT_UPDATES.labels(fmt, "refused").inc()
            log.warning("weight update refused", extra={"version": version, "reason": str(e)})
            raise
        seconds = await self._swap(update_from_folder(version, fmt, folder), cleanup=folder)
        self._received.append(folder)
        while len(self._received) > KEEP_RECEIVED:
            shutil.rmtree(self._received.pop(0), ignore_errors=True)
        return seconds

    async def _checked(self, update: WeightUpdate, prepare) -> object:
        """Names, shapes (or the adapter) and sha256 checked, and `prepare(update)` run while
        the bytes are hashed; nothing serves before both end. The prepared update."""
        if update.fmt == FULL:
            await asyncio.to_thread(check_full, update.files, self.base_shapes, self.tied)
        elif update.fmt == LORA:
            update.lora = await asyncio.to_thread(check_lora, update.folder, self.base_shapes, self.max_lora_rank)
        else:
            raise WeightsRefused(f"unknown weight format {update.fmt!r}")
        verify = asyncio.to_thread(verify_sha256, update.files[0], *update.sha256) if update.sha256 else None
        results = await asyncio.gather(prepare(update), verify or asyncio.sleep(0), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if not isinstance(results[0], BaseException) and prepare == self.backend.prepare:
                await self.backend.discard(results[0])
            raise errors[-1]
        return results[0]

    async def _swap(self, update: WeightUpdate, cleanup: Path | None = None) -> float:
        start = time.perf_counter()
        try:
            async with self._swap_lock:
                prepared = await self._checked(update, self.backend.prepare)
                restore = None
                if update.fmt == LORA and self._full_version != 0:
                    restore = await self.backend.prepare(WeightUpdate(0, FULL, self.base_files))
                # a LoRA candidate is an adapter on the initial weights: other full weights end it
                # (a full-weight candidate is its own model copy: it serves on)
                cand = self.gate.candidate
                ends_candidate = cand is not None and cand.fmt == LORA and update.fmt == FULL and update.version != 0
                if restore is not None or self.backend.drains(update):
                    async with self.gate.drained():
                        if restore is not None:
                            await self.backend.activate(restore)
                            self._full_version = 0
                        handle = await self.backend.activate(prepared)
                        self.gate.set(Served(update.version, update.fmt, handle))
                        if update.fmt == FULL:
                            self._full_version = update.version
                        if ends_candidate:
                            self._end_candidate("the stable version is now full weights")
                else:
                    handle = await self.backend.activate(prepared)
                    self.gate.set(Served(update.version, update.fmt, handle))
                    if ends_candidate:
                        self._end_candidate("the stable version is now full weights")
        except WeightsRefused as e:
            WEIGHT_UPDATES.labels(update.fmt, "refused").inc()
            log.warning("weight update refused", extra={"version": update.version, "reason": str(e)})
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        WEIGHT_UPDATES.labels(update.fmt, "served").inc()
        WEIGHT_SYNC_SECONDS.labels(update.fmt).observe(seconds)
        POLICY_VERSION.set(update.version)
        log.info(
            "serving new weights", extra={"version": update.version, "format": update.fmt, "seconds": round(seconds, 3)}
        )
        return seconds

    # --- the canary's candidate ---------------------------------------------------------

    async def load_candidate(self, version: int, sha256: str = "", fmt: str = "") -> float:
        """Serve weight-store `version` as the candidate beside the stable version (replacing
        any candidate before it; requests on that one finish on it). The stable version's
        requests are not drained. `WeightsRefused` when the version is not published, its
        bytes are wrong, or this backend cannot serve it beside the stable version."""
        start = time.perf_counter()
        if version == self.version:
            raise WeightsRefused(f"version {version} is the stable version: it cannot also be the candidate")
        try:
            update = await asyncio.to_thread(store_version, self.store, version, "", sha256)
            if fmt and fmt != update.fmt:
                raise WeightsRefused(f"format: version {version} is stored as {update.fmt!r}, the request says {fmt!r}")
            if update.fmt == LORA and self._full_version != 0:
                raise WeightsRefused(
                    f"version {version} is a LoRA adapter on the initial weights, but the stable version "
                    f"{self.version} is other full weights: it cannot be served beside it"
                )
            async with self._swap_lock:
                prepared = await self._checked(update, self.backend.prepare_candidate)
                handle = await self.backend.activate_candidate(prepared)
                self._end_candidate(f"replaced by version {version}")
                self.gate.set_candidate(Served(version, update.fmt, handle))
        except WeightsRefused as e:
            WEIGHT_UPDATES.labels(fmt or "unknown", "refused").inc()
            log.warning("candidate refused", extra={"version": version, "reason": str(e)})
            raise
        seconds = time.perf_counter() - start
        WEIGHT_UPDATES.labels(update.fmt, "served").inc()
        WEIGHT_SYNC_SECONDS.labels(update.fmt).observe(seconds)
        log.info(
            "serving a candidate beside the stable version",
            extra={"version": version, "stable": self.version, "format": update.fmt, "seconds": round(seconds, 3)},
        )
        return seconds

    async def drop_candidate(self, reason: str = "") -> None:
        """Serve the stable version alone; requests still running on the candidate finish on it."""
        async with self._swap_lock:
            self._end_candidate(reason)

    async def promote_candidate(self) -> None:
        """The candidate becomes the stable version, without reloading it (vLLM: its adapter
        already serves; transformers: merged into the weights, a drained swap)."""
        async with self._swap_lock:
            cand = self.gate.candidate
            if cand is None:
                raise NotServed("no candidate is served: there is nothing to promote")
            if self.backend.promote_drains():
                async with self.gate.drained():
                    handle = await self.backend.promote_candidate(cand.handle)
                    self.gate.set(Served(cand.version, cand.fmt, handle))
                    self.gate.set_candidate(None)
                    if cand.fmt == FULL:  # its weights are the model's now
                        self._full_version = cand.version
            else:
                handle = await self.backend.promote_candidate(cand.handle)
                self.gate.set(Served(cand.version, cand.fmt, handle))
                self.gate.set_candidate(None)
        POLICY_VERSION.set(cand.version)
        log.info("candidate promoted: it is the stable version now", extra={"version": cand.version})

    def _end_candidate(self, reason: str) -> None:
        """No new request gets the candidate; it is freed once its last request ended."""
        cand = self.gate.candidate
        if cand is None:
            return
        self.gate.set_candidate(None)
        log.info("candidate no longer served", extra={"version": cand.version, "reason": reason})

        async def retire() -> None:
            await self.gate.idle(cand.version)
            if self.gate.current.handle is not cand.handle:  # not promoted meanwhile
                await self.backend.drop_candidate(cand.handle)

        task = asyncio.get_running_loop().create_task(retire(), name=f"retire-candidate-v{cand.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
