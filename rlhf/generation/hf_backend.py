"""transformers backend: continuous batching with a KV cache, on one engine thread.

Up to `max_batch` sequences decode together (a request with n samples is n sequences). With
`batching="continuous"` (the default) requests join the running batch between two decode
steps and leave it when they end (rlhf/generation/batching.py): a chat does not wait for a
rollout batch to finish. Newcomers are taken in priority order within `max_batch` slots and
`prefill_token_budget` prompt tokens per step (no chunked prefill: a longer prompt joins
alone in its step). `batching="static"` keeps the old rule: a batch runs to its end, and
requests that arrive meanwhile wait for the next. An idle engine waits `batch_wait_ms` after
the first request so that requests sent together start together.

Pre-emption (`preemption=True`, continuous batching only): while interactive work (priority
below `rlhf.priorities.BACKGROUND`) decodes or waits, background rows (rollouts, evals) are
parked, split off the running batch with their KV cache (`RunningBatch.take`), and the decode
steps run the interactive rows alone; the parked rows rejoin (`RunningBatch.join`) when no
interactive work is left, unchanged, so their tokens and log-probs are the ones they would
have had. A row parked `preempt_max_wait_seconds` in all comes back even while chats run,
and is not parked again; a background request that has waited that long in the queue joins
while chats run, and is never parked: a rollout is delayed by about that much, never starved
(people who chat without pause would otherwise hold every rollout back for ever).

The loop is written out rather than calling `generate()` so that it can stream per-token
deltas with exact log-probs, stop each row on its own EOS / stop string / max_tokens, and
drop finished or cancelled rows at the next step. Weight swaps run on the same thread: while
one waits, nobody joins, the running rows finish, and the swap falls between two batches
(the generator has drained its requests by then anyway: `drains()` is True).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from transformers import DynamicCache

from rlhf.generation.adapters import Factors, RowAdapters, row_adapters
from rlhf.generation.backend import Backend
from rlhf.generation.batching import (
    CONTINUOUS,
    STATIC,
    Job,
    Penalties,
    Row,
    RunningBatch,
    admit,
    cache_layers,
    supports_merging,
)
from rlhf.generation.metrics import RequestStats
from rlhf.generation.text import TextTracker
from rlhf.generation.types import Delta, Sampling, WeightsRefused
from rlhf.generation.weights import FULL, WeightUpdate, lora_factors
from rlhf.models import load_causal_lm, load_tokenizer, pad_id, resolve_device
from rlhf.priorities import BACKGROUND

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The backend stopped while the request was decoding (after the server's drain)."""


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        max_batch: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
        batch_wait_ms: float = 5.0,
        batching: str = CONTINUOUS,
        prefill_token_budget: int = 512,
        preemption: bool = True,
        preempt_max_wait_seconds: float = 30.0,
        candidate_memory_margin_gib: float = 1.0,
        candidate_memory_limit_gib: float = 0.0,
    ):
        if batching not in (CONTINUOUS, STATIC):
            raise ValueError(f"batching must be {CONTINUOUS!r} or {STATIC!r}, got {batching!r}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be at least 1, got {prefill_token_budget}")
        if preempt_max_wait_seconds < 0:
            raise ValueError(f"preempt_max_wait_seconds must be at least 0, got {preempt_max_wait_seconds}")
        self.model_dir = Path(model_dir)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.batching = batching
        self.prefill_token_budget = prefill_token_budget
        self.preemption = preemption
        self.preempt_max_wait_s = preempt_max_wait_seconds
        if candidate_memory_margin_gib < 0 or candidate_memory_limit_gib < 0:
            raise ValueError("candidate_memory_margin_gib and candidate_memory_limit_gib must be at least 0")
        self.candidate_margin_bytes = int(candidate_memory_margin_gib * 2**30)
        self.candidate_limit_bytes = int(candidate_memory_limit_gib * 2**30)  # 0: what the machine has free
        self._full: dict[int, Any] = {}  # full-weight candidates: handle (< 0) → their own model copy
        self._full_ids = itertools.count(-1, -1)  # LoRA adapter ids are > 0, the merged weights 0
        self.device = resolve_device(device)
        self.dtype = getattr(torch, dtype)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._pending: list[Job] = []  # appended on the event loop, taken on the engine thread
        self._lock = threading.Lock()
        self._swaps_waiting = 0  # while > 0 the running batch takes no newcomer
        self._stopping = False
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._base: dict[str, torch.Tensor] = {}  # weights before the merged LoRA, to undo it
        self._merged: Factors | None = None  # that LoRA's factors (a candidate's rows subtract it)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = await loop.run_in_executor(
            self._thread, lambda: load_causal_lm(self.model_dir, dtype=self.dtype, device=self.device)
        )
        if self.batching == CONTINUOUS and not supports_merging(self.model.config):
            log.warning("the model's KV cache has sliding-window layers: static batching")
            self.batching = STATIC
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = pad_id(self.tokenizer)
        self.vocab = self.model.config.vocab_size
        self._scheduler = asyncio.create_task(self._schedule(), name="hf-scheduler")

    async def stop(self) -> None:
        self._stopping = True  # the running rows' callers get EngineStopped at the next step
        if self._scheduler is not None:
            self._scheduler.cancel()
        await asyncio.to_thread(self._thread.shutdown, wait=True, cancel_futures=True)

    # --- generation -----------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        handle: Any,
        stream: bool = True,
    ) -> AsyncIterator[Delta]:
        job = Job(list(prompt_ids), sampling, asyncio.get_running_loop(), stream, stats=RequestStats(sampling.priority))
        job.adapter = handle or 0  # a canary candidate's per-row adapter id (activate_candidate)
        with self._lock:
            self._pending.append(job)
        self._wake.set()
        finished = 0
        try:
            while finished < sampling.n:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished += item.finish_reason is not None
                yield item
        finally:
            job.cancelled = True  # its rows leave the batch at the next step
            job.stats.done()

    def _waiting(self) -> bool:
        with self._lock:
            return any(not j.cancelled for j in self._pending)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_wait_s)
            self._wake.clear()
            while self._waiting() and not self._swaps_waiting and not self._stopping:
                await loop.run_in_executor(self._thread, self._run)

    def _admit(self, running: int, below: int | None = None) -> list[Job]:
        if self._swaps_waiting or self._stopping:
            return []
        with self._lock:
            return admit(
                self._pending,
                running,
                self.max_batch,
                self.batching,
                self.prefill_token_budget,
                below,
                self.preempt_max_wait_s,
            )

    def _interactive(self, batch: RunningBatch) -> bool:
        """Whether interactive work (priority below BACKGROUND) is decoding, or waiting and
        free to join. Requests held back by a queued swap do not count: the parked rows must
        finish before the swap, and the swap before them."""
        if any(r.job.sampling.priority < BACKGROUND for r in batch.rows):
            return True
        if self._swaps_waiting or self._stopping:
            return False
        with self._lock:
            return any(j.sampling.priority < BACKGROUND and not j.cancelled for j in self._pending)

    def _preempt(self, batch: RunningBatch, parked: RunningBatch, interactive: bool) -> bool:
        """Park the background rows while interactive work is present; bring back the parked
        rows that are due (all once no interactive work is left; those parked
        `preempt_max_wait_seconds` in all at any time), as many as `max_batch` has room for.
        Returns whether newcomers may join this step: not while due rows wait for room."""
        now = time.perf_counter()
        if interactive:
            out = [b for b, r in enumerate(batch.rows) if r.job.sampling.priority >= BACKGROUND and not r.exempt]
            if out:
                for b in out:
                    batch.rows[b].parked_at = now
                parked.join(batch.take(out), self.vocab)
        due = [
            b
            for b, r in enumerate(parked.rows)
            if not interactive or r.parked_s + (now - r.parked_at) >= self.preempt_max_wait_s
        ]
        back = due[: max(0, self.max_batch - len(batch))]
        if back:
            for b in back:
                row = parked.rows[b]
                row.parked_s += now - row.parked_at
                row.parked_at = None
                row.exempt = row.parked_s >= self.preempt_max_wait_s
            batch.join(parked.take(back), self.vocab)
        return len(back) == len(due)

    @torch.inference_mode()
    def _run(self) -> None:
        """Decode until no row is left and nobody may join (on the engine thread)."""
        batch = RunningBatch()
        parked = RunningBatch()  # pre-empted background rows, their KV kept
        while True:
            joining: list[Job] = []
            try:
                # 1. finished and cancelled rows leave the batch and free their slots
                batch.keep([b for b, r in enumerate(batch.rows) if not (r.done or r.job.cancelled)])
                parked.keep([b for b, r in enumerate(parked.rows) if not r.job.cancelled])
                if self._stopping and (batch.rows or parked.rows):
                    raise EngineStopped("the generator stopped before this request finished")
                # 2. pre-emption: background rows park while interactive work is present
                below, may_join = None, True
                if self.preemption and self.batching == CONTINUOUS:
                    interactive = self._interactive(batch)
                    may_join = self._preempt(batch, parked, interactive)
                    below = BACKGROUND if interactive else None
                # 3. who joins now (static: only an empty batch takes anyone)
                joining = self._admit(len(batch), below) if may_join else []
                if not batch.rows and not joining:
                    if parked.rows:
                        continue  # an interactive request went away before it joined: they come back
                    return
                # 4. one decode step of the running rows, then the newcomers' prefill
                logits = batch.step(self._forward_model()) if batch.rows else None  # (B, V)
                if joining:
                    new, new_logits = self._prefill(joining)
                    batch.join(new, self.vocab)
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
                # 5. every row draws its next token and hears about it
                self._draw(batch, logits)
            except Exception as e:  # noqa: BLE001 - handed to every caller in the batch
                if not isinstance(e, EngineStopped):
                    log.exception("decode step failed")
                jobs = {id(j): j for j in [r.job for r in batch.rows + parked.rows] + joining}
                for job in jobs.values():
                    job.emit(e)
                batch, parked = RunningBatch(), RunningBatch()

    def _prefill(self, jobs: list[Job]) -> tuple[RunningBatch, torch.Tensor]:
        """The joining jobs' prompts in one left-padded forward pass with their own cache;
        each of a job's n samples gets a copy of its prompt's KV. Returns the new rows and
        their (N, V) next-token logits."""
        for job in jobs:
            job.stats.scheduled()  # queue time ends as the row's prefill starts
        dev = self.device
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)  # (J, P) left-padded
        mask = torch.zeros((len(jobs), width), dtype=torch.long)  # (J, P) 1 = real token
        for j, job in enumerate(jobs):
            ids[j, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[j, width - len(job.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (J, P)
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        cache = DynamicCache(config=self.model.config)
        adapter = None
        if any(job.adapter for job in jobs):
            adapter = torch.tensor([job.adapter for job in jobs], device=dev)  # (J,)
        model = self._forward_model()
        with row_adapters(model, adapter):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]  # (J, V)
        rows = [
            Row(
                job,
                i,
                TextTracker(self.tokenizer, job.sampling.stop),
                _row_generator(job.sampling, i, dev),
                exempt=job.overdue,  # it waited the bound in the queue: never parked
            )
            for job in jobs
            for i in range(job.sampling.n)
        ]
        expand = torch.tensor([j for j, job in enumerate(jobs) for _ in range(job.sampling.n)], device=dev)  # (N,)
        cache.batch_select_indices(expand)
        new = RunningBatch(
            rows=rows,
            cache=cache,
            mask=mask[expand],
            next_pos=(positions[:, -1] + 1)[expand],
            temperature=torch.tensor([r.job.sampling.temperature for r in rows], device=dev),
            top_p=torch.tensor([r.job.sampling.top_p for r in rows], device=dev),
            penalties=Penalties.of(rows, self.vocab, dev),
            adapter=None if adapter is None else adapter[expand],
        )
        return new, logits[expand].float()

    def _draw(self, batch: RunningBatch, logits: torch.Tensor) -> None:
        """Draw each row's next token from `logits` (B, V), report it with its raw log-prob,
        and mark the rows that end."""
        rows = batch.rows
        logp = F.log_softmax(logits, dim=-1)  # (B, V) raw log π
        # penalties and biases change which token is drawn, not the reported log-prob
        drawn_from = logits if batch.penalties is None else batch.penalties.apply(logits)
        tokens = self._sample(drawn_from, batch.temperature, batch.top_p, rows)  # (B,)
        token_logp = logp.gather(-1, tokens[:, None])[:, 0]  # (B,)
        if batch.penalties is not None:
            batch.penalties.count(tokens)
        batch.tokens = tokens
        top_k = max(r.job.sampling.top_logprobs for r in rows)  # alternatives to report per step
        tops: list[list[tuple[int, float]]] = []
        if top_k:
            top_lp, top_ids = logp.topk(top_k, dim=-1)  # (B, k) most likely first
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
        now = time.perf_counter()
        for b, (tok, lp) in enumerate(zip(tokens.tolist(), token_logp.tolist())):
            row = rows[b]
            row.count += 1
            text = row.text.push(tok)
            finish = None
            if (tok in self.eos_ids and not row.job.sampling.ignore_eos) or row.text.stopped:
                finish = "stop"
            elif row.count >= row.job.sampling.max_tokens:
                finish = "length"
            row.job.stats.token(row.index, now=now)
            if finish:
                text += row.text.finish()
                row.done = True
                row.job.stats.sample_done(row.index)
            k = row.job.sampling.top_logprobs
            top = [tops[b][:k]] if k else []
            if row.job.cancelled:
                continue
            if row.job.stream:
                row.job.emit(Delta(row.index, [tok], [lp], text, finish, top))
            else:
                row.held = row.held or Delta(row.index)
                row.held.token_ids.append(tok)
                row.held.logprobs.append(lp)
                row.held.top += top
                row.held.text += text
                if finish:
                    row.held.finish_reason = finish
                    row.job.emit(row.held)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """(B,) next tokens: argmax where temperature is 0, else nucleus sampling (Holtzman
        et al. 2020) from softmax(logits / T), with each seeded row on its own generator.

        Draws use the exponential race, argmax(p / E) with E ~ Exp(1), which picks token i with
        probability p_i, as vLLM's sampler does: torch.multinomial over a 49k vocabulary on
        CPU costs ~30 ms per row."""
        greedy = logits.argmax(-1)  # (B,)
        sampled_rows = (temperature > 0).nonzero()[:, 0].tolist()
        if not sampled_rows:
            return greedy
        probs = F.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)  # (B, V)
        if bool((top_p < 1).any()):
            sorted_p, order = probs.sort(-1, descending=True)
            outside = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # mass before the token ≥ top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        race = torch.empty_like(probs)  # (B, V) E ~ Exp(1)
        seeded = [b for b in sampled_rows if rows[b].generator is not None]
        if len(seeded) < len(sampled_rows):
            race.exponential_()
        for b in seeded:
            race[b].exponential_(generator=rows[b].generator)
        drawn = probs.div_(race).argmax(-1)  # (B,)
        return torch.where(temperature > 0, drawn, greedy)

    # --- weights ----------------------------------------------------------------------

    def drains(self, update: WeightUpdate) -> bool:
        return True  # weights change in place

    async def prepare(self, update: WeightUpdate) -> Any:
        loop = asyncio.get_running_loop()
        if update.fmt == FULL:

            def read() -> dict[str, torch.Tensor]:
                # read the bytes now (not a lazy mmap), so the drained swap is only a copy
                state: dict[str, torch.Tensor] = {}
                for f in update.files:
                    state.update(safetensors_load(f.read_bytes()))
                return state

            return FULL, await loop.run_in_executor(None, read)
        factors = await loop.run_in_executor(None, lora_factors, update.folder, update.lora)
        return "lora", {f"{m}.weight": b @ a for m, (a, b) in factors.items()}, factors

    async def activate(self, prepared: Any) -> Any:
        # queued behind the running batch on the engine thread: from now on nobody joins it,
        # so a steady stream of requests cannot starve the swap
        self._swaps_waiting += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._apply, *prepared)
        finally:
            self._swaps_waiting -= 1
            self._wake.set()  # requests that waited for the swap start
        return None

    @torch.no_grad()
    def _apply(self, fmt: str, tensors: dict[str, torch.Tensor], factors: Factors | None = None) -> None:
        params = self.model.state_dict()
        self._merged = factors if fmt != FULL else None
        adapters = getattr(self.model, "_rlhf_row_adapters", None)
        if adapters is not None:  # resident candidates are re-expressed against the new weights
            adapters.apply_pending()
            adapters.merged(self._merged)
        if fmt == FULL:
            self._base.clear()
            for name, value in tensors.items():
                params[name].copy_(value)
            return
        # LoRA merged into the base weights: W = W_base + ΔW; modules of the previous
        # adapter that this one does not touch go back to W_base.
        for name in list(self._base):
            if name not in tensors:
                params[name].copy_(self._base.pop(name))
        for name, delta in tensors.items():
            base = self._base.setdefault(name, params[name].detach().clone())
            params[name].copy_(base + delta.to(base.dtype))

    # --- the canary's candidate (rlhf/generation/adapters.py) -------------------------

    async def prepare_candidate(self, update: WeightUpdate) -> Any:
        """A LoRA candidate's factors, or a full-weight candidate's own model copy, read while
        everything serves on. A full-weight candidate is refused, naming the bytes it needs and
        those available, unless the memory free (`candidate_memory_limit_gib` if set, else the
        device's: psutil on the CPU, cudaMemGetInfo on a GPU) covers a second copy of the
        weights plus `candidate_memory_margin_gib`."""
        if update.fmt == FULL:
            return FULL, await asyncio.get_running_loop().run_in_executor(None, self._full_copy, update)
        factors = await asyncio.get_running_loop().run_in_executor(None, lora_factors, update.folder, update.lora)
        RowAdapters.of(self.model, self._merged).check(factors)
        return factors

    async def activate_candidate(self, prepared: Any) -> Any:
        """Make the candidate resident (no drain: it is used from the engine's next forward on),
        a LoRA one as a per-row adapter, a full one as a model copy; its id is the lease handle."""
        if isinstance(prepared, tuple) and prepared[0] == FULL:
            handle = next(self._full_ids)
            self._full = {**self._full, handle: prepared[1]}  # a new dict: the engine thread reads it
            return handle
        return RowAdapters.of(self.model, self._merged).add(prepared)

    async def drop_candidate(self, handle: Any) -> None:
        if isinstance(handle, int) and handle < 0:  # a full-weight candidate's copy
            if handle in self._full:
                self._full = {k: v for k, v in self._full.items() if k != handle}
                gc.collect()  # its weights go back to the machine now
            return
        RowAdapters.of(self.model, self._merged).remove(handle)

    def candidate_bytes(self) -> int:
        """Bytes a second copy of the model's weights takes (parameters and buffers)."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def available_bytes(self) -> int:
        """Memory free for a candidate's copy: `candidate_memory_limit_gib` when set, else the
        device's free memory (capped by the limit when both apply)."""
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return min(free, self.candidate_limit_bytes) if self.candidate_limit_bytes else free

    def _full_copy(self, update: WeightUpdate) -> Any:
        """A second model with `update`'s full weights, after the memory check (worker thread)."""
        need, have = self.candidate_bytes() + self.candidate_margin_bytes, self.available_bytes()
        if need > have:
            raise WeightsRefused(
                f"version {update.version} is a full-weight candidate: a second model copy needs {need:,} bytes "
                f"(weights {need - self.candidate_margin_bytes:,} + margin {self.candidate_margin_bytes:,}) and "
                f"{have:,} are available; serve it as a LoRA adapter, free memory, or lower "
                "candidate_memory_margin_gib"
            )
        model = load_causal_lm(self.model_dir, dtype=self.dtype, device=self.device)
        params = model.state_dict()
        with torch.no_grad():
            for f in update.files:
                for name, value in safetensors_load(f.read_bytes()).items():
                    params[name].copy_(value)
        return model

    def _forward_model(self) -> Any:
        """What a forward runs: the model itself, or, while a full-weight candidate is
        resident, `_Models`, which runs each row on its own version's copy."""
        full = self._full
        return _Models(self.model, full) if full else self.model

    def promote_drains(self) -> bool:
        return True  # the candidate is merged into the weights in place

    async def promote_candidate(self, handle: Any) -> Any:
        """Merge the candidate's adapter into the weights (with nobody running: the generator
        drains) and drop it as a per-row adapter, or copy a full-weight candidate's weights in
        and free its copy; the new stable version's handle (None)."""
        if handle in self._full:
            state = {k: v.detach() for k, v in self._full[handle].state_dict().items()}
            await self.activate((FULL, state))
            await self.drop_candidate(handle)
            return None
        adapters = RowAdapters.of(self.model, self._merged)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, adapters.apply_pending)
        factors = adapters.factors(handle)
        adapters.remove(handle)
        await self.activate(("lora", {f"{m}.weight": b @ a for m, (a, b) in factors.items()}, factors))
        return None


class _Models:
    """Stands in for the model in one forward when full-weight candidates are resident: rows
    whose adapter id is a full candidate's handle (< 0) run on that candidate's model copy,
    the others on the stable model (with their LoRA ids, if any). One forward pass per
    version present; the KV cache is split by rows before and put back together after (the
    models share an architecture, so their caches have the same shapes)."""

    def __init__(self, stable: Any, full: dict[int, Any]):
        self.stable, self.full = stable, full
        self.config = stable.config
        self._rlhf_row_adapters = self  # `row_adapters(model, ids)` hands the ids to `rows`
        self._ids: torch.Tensor | None = None

    @contextmanager
    def rows(self, ids: torch.Tensor | None) -> Iterator[None]:
        self._ids = ids
        try:
            yield
        finally:
            self._ids = None

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, **kw) -> Any:
        ids = self._ids
        if ids is None or not bool((ids < 0).any()):
            with row_adapters(self.stable, ids):
                return self.stable(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    **kw,
                )
        groups = [(h, (ids == h).nonzero()[:, 0]) for h in sorted({int(i) for i in ids.tolist() if i < 0})]
        stable_rows = (ids >= 0).nonzero()[:, 0]
        if len(stable_rows):
            groups.append((0, stable_rows))
        layers = cache_layers(past_key_values)
        started = bool(layers) and layers[0].is_initialized
        outs = []
        for handle, sel in groups:
            model = self.stable if handle == 0 else self.full.get(handle, self.stable)  # dropped: its rows are gone
            sub = (
                DynamicCache([(layer.keys[sel], layer.values[sel]) for layer in layers])
                if started
                else DynamicCache(config=self.config)
            )
            with row_adapters(model, ids[sel] if handle == 0 else None):
                out = model(
                    input_ids=input_ids[sel],
                    attention_mask=attention_mask[sel],
                    position_ids=position_ids[sel],
                    past_key_values=sub,
                    **kw,
                )
            outs.append((sel, out.logits, cache_layers(sub)))
        rows = len(ids)
        first = outs[0][1]
        logits = first.new_empty((rows, *first.shape[1:]))
        for sel, lg, _ in outs:
            logits[sel] = lg
        for k, layer in enumerate(layers if started else []):
            keys = outs[0][2][k].keys
            layer.keys = keys.new_empty((rows, *keys.shape[1:]))
            layer.values = layer.keys.clone()
            for sel, _, sub_layers in outs:
                layer.keys[sel], layer.values[sel] = sub_layers[k].keys, sub_layers[k].values
        if not started:  # a prefill: the passed cache was empty, fill its layers
            for k, layer in enumerate(layers):
                shape = outs[0][2][k].keys.shape
                keys = outs[0][2][k].keys.new_empty((rows, *shape[1:]))
                values = keys.clone()
                for sel, _, sub_layers in outs:
                    keys[sel], values[sel] = sub_layers[k].keys, sub_layers[k].values
                layer.update(keys, values)
        return SimpleNamespace(logits=logits)


def _row_generator(sampling: Sampling, index: int, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None or sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((sampling.seed * 1_000_003 + index) % (2**63))
    return g
