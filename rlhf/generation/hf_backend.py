"""transformers backend: static batches decoded with a KV cache, one engine thread.

Requests that arrive while a batch decodes wait for the next batch (up to `max_batch`
sequences; a request with n samples is n sequences). An idle engine waits `batch_wait_ms`
after the first request so that requests sent together are decoded together. The loop is written out rather than
calling `generate()` so that it can stream per-token deltas with exact log-probs, stop each
row on its own EOS / stop string / max_tokens, and drop finished rows from the batch.
Weight swaps run on the same thread, so they fall between batches by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from transformers import DynamicCache

from rlhf.generation.backend import Backend
from rlhf.generation.metrics import RequestStats
from rlhf.generation.text import TextTracker
from rlhf.generation.types import Delta, Sampling
from rlhf.generation.weights import FULL, WeightUpdate, lora_deltas
from rlhf.models import load_causal_lm, load_tokenizer, pad_id, resolve_device

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool = True
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    stats: RequestStats | None = None  # queue time, tokens, waiting/running (rlhf.generation.metrics)

    def emit(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Row:
    job: _Job
    index: int
    text: TextTracker
    generator: torch.Generator | None
    count: int = 0
    done: bool = False
    held: Delta | None = None  # stream=False: the sample so far, handed over when it ends


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        max_batch: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
        batch_wait_ms: float = 5.0,
    ):
        self.model_dir = Path(model_dir)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.device = resolve_device(device)
        self.dtype = getattr(torch, dtype)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._pending: list[_Job] = []
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._base: dict[str, torch.Tensor] = {}  # weights before the merged LoRA, to undo it

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = await loop.run_in_executor(
            self._thread, lambda: load_causal_lm(self.model_dir, dtype=self.dtype, device=self.device)
        )
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = pad_id(self.tokenizer)
        self._scheduler = asyncio.create_task(self._schedule(), name="hf-scheduler")

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._thread.shutdown(wait=True, cancel_futures=True)

    # --- generation -----------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        handle: Any,
        stream: bool = True,
    ) -> AsyncIterator[Delta]:
        job = _Job(
            list(prompt_ids), sampling, asyncio.get_running_loop(), stream, stats=RequestStats(sampling.priority)
        )
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
            job.cancelled = True
            job.stats.done()

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.batch_wait_s)
            self._wake.clear()
            while self._pending:
                # a person waiting (priority 0) before background work; arrival order within
                # a priority (sort is stable). A running batch is not interrupted.
                self._pending.sort(key=lambda j: j.sampling.priority)
                batch, rows = [], 0
                while self._pending and (not batch or rows + self._pending[0].sampling.n <= self.max_batch):
                    job = self._pending.pop(0)
                    if not job.cancelled:
                        batch.append(job)
                        rows += job.sampling.n
                if not batch:
                    continue
                try:
                    await loop.run_in_executor(self._thread, self._decode, batch)
                except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                    log.exception("batch failed")
                    for job in batch:
                        job.emit(e)

    @torch.inference_mode()
    def _decode(self, jobs: list[_Job]) -> None:
        rows = [
            _Row(job, i, TextTracker(self.tokenizer, job.sampling.stop), _row_generator(job.sampling, i, self.device))
            for job in jobs
            for i in range(job.sampling.n)
        ]
        for job in jobs:
            job.stats.scheduled()  # the batch's first decode step (prefill) starts now
        dev = self.device
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P) 1 = real token
        for b, r in enumerate(rows):
            ids[b, width - len(r.job.prompt_ids) :] = torch.tensor(r.job.prompt_ids)
            mask[b, width - len(r.job.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        temperature = torch.tensor([r.job.sampling.temperature for r in rows], device=dev)  # (B,)
        top_p = torch.tensor([r.job.sampling.top_p for r in rows], device=dev)  # (B,)
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        top_k = max(r.job.sampling.top_logprobs for r in rows)  # alternatives to report per step
        penalties = _Penalties.of(rows, self.model.config.vocab_size, dev)  # None: no row has any

        cache = DynamicCache(config=self.model.config)
        logits = (
            self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            .logits[:, -1]
            .float()
        )  # (B, V)
        next_pos = positions[:, -1] + 1  # (B,)
        live = list(range(len(rows)))  # row index of each batch position
        while True:
            logp = F.log_softmax(logits, dim=-1)  # (B, V) raw log π
            # penalties and biases change which token is drawn, not the reported log-prob
            drawn_from = logits if penalties is None else penalties.apply(logits)
            tokens = self._sample(drawn_from, temperature, top_p, [rows[i] for i in live])  # (B,)
            token_logp = logp.gather(-1, tokens[:, None])[:, 0]  # (B,)
            if penalties is not None:
                penalties.count(tokens)
            tops: list[list[tuple[int, float]]] = []
            if top_k:
                top_lp, top_ids = logp.topk(top_k, dim=-1)  # (B, k) most likely first
                tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
            now = time.perf_counter()
            keep = []
            for b, (tok, lp) in enumerate(zip(tokens.tolist(), token_logp.tolist())):
                row = rows[live[b]]
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
                if not row.job.cancelled:
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
                if not row.done and not row.job.cancelled:
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                tokens, mask, next_pos = tokens[sel], mask[sel], next_pos[sel]
                temperature, top_p = temperature[sel], top_p[sel]
                if penalties is not None:
                    penalties.select(sel)
                live = [live[b] for b in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L+1)
            logits = (
                self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=next_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )
            next_pos = next_pos + 1

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
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
        await asyncio.get_running_loop().run_in_executor(self._thread, self._apply, *prepared)
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


@dataclass
class _Penalties:
    """OpenAI's frequency/presence penalties and logit_bias for a batch: the logits a
    token is drawn from are `logits + bias - frequency * count - presence * (count > 0)`,
    `count` being how often the token occurred in the sample so far (not the prompt)."""

    bias: torch.Tensor  # (B, V)
    frequency: torch.Tensor  # (B, 1)
    presence: torch.Tensor  # (B, 1)
    counts: torch.Tensor  # (B, V)

    @classmethod
    def of(cls, rows: list[_Row], vocab: int, dev: torch.device) -> "_Penalties | None":
        if not any(r.job.sampling.penalised for r in rows):
            return None
        bias = torch.zeros((len(rows), vocab), device=dev)
        for b, r in enumerate(rows):
            for token, value in r.job.sampling.logit_bias:
                bias[b, token] = value
        frequency = torch.tensor([[r.job.sampling.frequency_penalty] for r in rows], device=dev)
        presence = torch.tensor([[r.job.sampling.presence_penalty] for r in rows], device=dev)
        return cls(bias, frequency, presence, torch.zeros((len(rows), vocab), device=dev))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]  # the LM head may be wider or narrower than config.vocab_size
        adjust = self.bias - self.frequency * self.counts - self.presence * (self.counts > 0)
        out = logits.clone()
        n = min(width, adjust.shape[-1])
        out[:, :n] += adjust[:, :n]
        return out

    def count(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        inside = tokens < self.counts.shape[-1]
        self.counts[rows[inside], tokens[inside]] += 1

    def select(self, sel: torch.Tensor) -> None:
        self.bias, self.counts = self.bias[sel], self.counts[sel]
        self.frequency, self.presence = self.frequency[sel], self.presence[sel]


def _row_generator(sampling: Sampling, index: int, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None or sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((sampling.seed * 1_000_003 + index) % (2**63))
    return g
