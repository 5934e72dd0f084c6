"""The generator: a backend, the version gate, request validation and weight swaps.

Versions: the weights the service starts with are version 0; every later version comes from
the weight store (`load_version`) or a gRPC stream (`receive`), and must be one the learner
published (`rlhf.generation.weights.published`: promoted in the store, or announced when this
generator has no store). A LoRA version is an adapter on the initial weights, the model the
learner trains its adapter against: loading one after a full version first restores the
initial weights (in the same drained swap).
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
from rlhf.generation.gate import Served, VersionGate
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
    ) -> AsyncIterator[tuple[int, Delta]]:
        """(policy version, delta) pairs; the version is the same for the whole request.
        Callers must close the iterator (`contextlib.aclosing`) so the lease ends with them."""
        async with self.gate.lease() as served:
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

    async def _swap(self, update: WeightUpdate, cleanup: Path | None = None) -> float:
        start = time.perf_counter()
        try:
            async with self._swap_lock:
                if update.fmt == FULL:
                    await asyncio.to_thread(check_full, update.files, self.base_shapes, self.tied)
                elif update.fmt == LORA:
                    update.lora = await asyncio.to_thread(
                        check_lora, update.folder, self.base_shapes, self.max_lora_rank
                    )
                else:
                    raise WeightsRefused(f"unknown weight format {update.fmt!r}")
                # hash the bytes while the backend reads them; nothing serves before both end
                verify = asyncio.to_thread(verify_sha256, update.files[0], *update.sha256) if update.sha256 else None
                results = await asyncio.gather(
                    self.backend.prepare(update), verify or asyncio.sleep(0), return_exceptions=True
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    if not isinstance(results[0], BaseException):
                        await self.backend.discard(results[0])
                    raise errors[-1]
                prepared = results[0]
                restore = None
                if update.fmt == LORA and self._full_version != 0:
                    restore = await self.backend.prepare(WeightUpdate(0, FULL, self.base_files))
                if restore is not None or self.backend.drains(update):
                    async with self.gate.drained():
                        if restore is not None:
                            await self.backend.activate(restore)
                            self._full_version = 0
                        handle = await self.backend.activate(prepared)
                        self.gate.set(Served(update.version, update.fmt, handle))
                        if update.fmt == FULL:
                            self._full_version = update.version
                else:
                    handle = await self.backend.activate(prepared)
                    self.gate.set(Served(update.version, update.fmt, handle))
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
