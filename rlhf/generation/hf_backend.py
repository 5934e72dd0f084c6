"""transformers backend: continuous batching with a KV cache, on one engine thread.

Up to `max_batch` sequences decode together (a request with n samples is n sequences). With
`batching="continuous"` (the default) requests join the running batch between two decode
steps and leave it when they end (rlhf/generation/batching.py): a chat does not wait for a
rollout batch to finish. Newcomers are taken in priority order within `max_batch` slots and
`prefill_token_budget` prompt tokens per step (no chunked prefill: a longer prompt joins
alone in its step). `batching="static"` keeps the old rule: a batch runs to its end, and
requests that arrive meanwhile wait for the next. An idle engine waits `batch_wait_ms` after
the first request so that requests sent together start together.

The loop is written out rather than calling `generate()` so that it can stream per-token
deltas with exact log-probs, stop each row on its own EOS / stop string / max_tokens, and
drop finished or cancelled rows at the next step. Weight swaps run on the same thread: while
one waits, nobody joins, the running rows finish, and the swap falls between two batches
(the generator has drained its requests by then anyway: `drains()` is True).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from transformers import DynamicCache

from rlhf.generation.backend import Backend
from rlhf.generation.batching import (
    CONTINUOUS,
    STATIC,
    Job,
    Penalties,
    Row,
    RunningBatch,
    admit,
    supports_merging,
)
from rlhf.generation.metrics import RequestStats
from rlhf.generation.text import TextTracker
from rlhf.generation.types import Delta, Sampling
from rlhf.generation.weights import FULL, WeightUpdate, lora_deltas
from rlhf.models import load_causal_lm, load_tokenizer, pad_id, resolve_device

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
    ):
        if batching not in (CONTINUOUS, STATIC):
            raise ValueError(f"batching must be {CONTINUOUS!r} or {STATIC!r}, got {batching!r}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be at least 1, got {prefill_token_budget}")
        self.model_dir = Path(model_dir)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.batching = batching
        self.prefill_token_budget = prefill_token_budget
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

    def _admit(self, running: int) -> list[Job]:
        if self._swaps_waiting or self._stopping:
            return []
        with self._lock:
            return admit(self._pending, running, self.max_batch, self.batching, self.prefill_token_budget)

    @torch.inference_mode()
    def _run(self) -> None:
        """Decode until no row is left and nobody may join (on the engine thread)."""
        batch = RunningBatch()
        while True:
            joining: list[Job] = []
            try:
                # 1. finished and cancelled rows leave the batch and free their slots
                batch.keep([b for b, r in enumerate(batch.rows) if not (r.done or r.job.cancelled)])
                if self._stopping and batch.rows:
                    raise EngineStopped("the generator stopped before this request finished")
                # 2. who joins now (static: only an empty batch takes anyone)
                joining = self._admit(len(batch))
                if not batch.rows and not joining:
                    return
                # 3. one decode step of the running rows, then the newcomers' prefill
                logits = batch.step(self.model) if batch.rows else None  # (B, V)
                if joining:
                    new, new_logits = self._prefill(joining)
                    batch.join(new, self.vocab)
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
                # 4. every row draws its next token and hears about it
                self._draw(batch, logits)
            except Exception as e:  # noqa: BLE001 - handed to every caller in the batch
                if not isinstance(e, EngineStopped):
                    log.exception("decode step failed")
                jobs = {id(j): j for j in [r.job for r in batch.rows] + joining}
                for job in jobs.values():
                    job.emit(e)
                batch = RunningBatch()

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
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (J, V)
        rows = [
            Row(job, i, TextTracker(self.tokenizer, job.sampling.stop), _row_generator(job.sampling, i, dev))
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
        return "lora", await loop.run_in_executor(None, lora_deltas, update.folder, update.lora)

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
    def _apply(self, fmt: str, tensors: dict[str, torch.Tensor]) -> None:
        params = self.model.state_dict()
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


def _row_generator(sampling: Sampling, index: int, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None or sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((sampling.seed * 1_000_003 + index) % (2**63))
    return g
