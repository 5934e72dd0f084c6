"""The running batch of the transformers backend: its rows, their KV cache, and who joins it.

Continuous (iteration-level) batching, as vLLM and TGI schedule: between two decode steps
finished and cancelled rows leave the batch and waiting requests join it. A joining request
is prefilled in its own forward pass with its own `DynamicCache`; its keys and values are
then merged into the running cache. The two sides are left-padded to the same length along
the sequence axis with zeros, and the attention mask is 0 over the padding, so a row attends
to exactly its own tokens; positions are per row (`next_pos`), so RoPE stays exact whatever
the padding. Static batching is the same loop with another admission rule: nobody joins a
batch that is still running.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlhf.generation.adapters import row_adapters
from rlhf.generation.metrics import RequestStats
from rlhf.generation.text import TextTracker
from rlhf.generation.types import Delta, Sampling

CONTINUOUS, STATIC = "continuous", "static"


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool = True
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    stats: RequestStats | None = None  # queue time, tokens, waiting/running (rlhf.generation.metrics)
    adapter: int = 0  # the per-row adapter its rows run (rlhf/generation/adapters.py); 0: the merged weights
    queued_at: float = field(default_factory=time.perf_counter)  # when it was submitted (perf_counter)
    overdue: bool = False  # queued `preempt_max_wait_seconds` while chats ran: admitted first, its rows exempt

    def emit(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class Row:
    job: Job
    index: int
    text: TextTracker
    generator: torch.Generator | None
    count: int = 0
    done: bool = False
    held: Delta | None = None  # stream=False: the sample so far, handed over when it ends
    parked_s: float = 0.0  # pre-emption: seconds spent parked so far (the starvation bound counts them)
    parked_at: float | None = None  # when it was parked last (None: not parked now)
    exempt: bool = False  # parked or queued past `preempt_max_wait_seconds`: not parked (again) until it ends


def admit(
    pending: list[Job],
    running: int,
    max_batch: int,
    batching: str,
    prefill_token_budget: int,
    below: int | None = None,
    max_wait: float | None = None,
) -> list[Job]:
    """Remove from `pending` and return the jobs that join a batch of `running` rows now.

    Lower `sampling.priority` first, arrival order within a priority (the sort is stable),
    and strictly in that order: a job that does not fit stops the admission, so a large
    request is not overtaken for ever by smaller ones behind it. A job of n samples takes n
    of the `max_batch` slots. Static: only an empty batch takes newcomers. Continuous: the
    joining prompts' tokens stay within `prefill_token_budget` per step; the prompt is not
    chunked, so one longer than the budget joins alone in its step. An empty batch always
    takes the first job, whatever its size. With `below` (pre-emption: interactive work is
    present), only jobs of a priority lower than `below` join; background jobs wait, except
    one queued `max_wait` seconds or more: it is marked `overdue` and goes ahead of every job
    that is not (aging), so it joins as soon as its rows fit and no chat queued after it
    takes the slots first. Without that bound a rollout that arrives while people chat
    without pause would never start, however long it waited; without the aging a group of n
    samples would wait behind every newer chat for n free slots."""
    pending[:] = [j for j in pending if not j.cancelled]
    if batching == STATIC and running:
        return []
    now = time.perf_counter()
    if below is not None and max_wait is not None:
        for j in pending:
            if j.sampling.priority >= below and now - j.queued_at >= max_wait:
                j.overdue = True
    # overdue jobs first, oldest first; then by priority, arrival order within one
    pending.sort(key=lambda j: (-1, j.queued_at) if j.overdue else (j.sampling.priority, j.queued_at))
    joining: list[Job] = []
    rows, tokens = running, 0
    while pending:
        job = pending[0]
        if below is not None and job.sampling.priority >= below and not job.overdue:
            break  # background work waits while chats are present
        first = not joining and not running
        if not first:
            if rows + job.sampling.n > max_batch:
                break
            if batching == CONTINUOUS and joining and tokens + len(job.prompt_ids) > prefill_token_budget:
                break
        joining.append(pending.pop(0))
        rows += job.sampling.n
        tokens += len(job.prompt_ids)
    return joining


def cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The layers of a transformers 5.x `DynamicCache` (`cache.layers`, each holding `.keys`
    and `.values` of shape (B, H, L, D)). Merging and trimming are written against
    `DynamicLayer`; a sliding-window layer keeps only its window and could not be merged
    this way, so it is refused."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"continuous batching needs full-attention DynamicLayer caches, not {type(layer).__name__}")
    return cache.layers


def supports_merging(config) -> bool:
    """Whether the model's cache layers are all plain `DynamicLayer`s (no sliding window)."""
    try:
        cache_layers(DynamicCache(config=config))
    except TypeError:
        return False
    return True


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class RunningBatch:
    """Rows decoding together: row b's cache, mask, position, last token and sampling
    parameters all sit at index b."""

    rows: list[Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, L) 1 = a real token, 0 = left padding
    next_pos: torch.Tensor | None = None  # (B,) position of the next token fed
    tokens: torch.Tensor | None = None  # (B,) last drawn tokens: the next step's input
    temperature: torch.Tensor | None = None  # (B,)
    top_p: torch.Tensor | None = None  # (B,)
    penalties: "Penalties | None" = None  # None: no row has any
    adapter: torch.Tensor | None = None  # (B,) per-row adapter id (0: the merged weights); None: all 0

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` stay (in the batch and the cache); then drop the columns that are
        padding in every row, so a long-gone long prompt does not widen the batch for ever."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        sel = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(sel)
        self.rows = [self.rows[b] for b in keep]
        self.mask, self.next_pos, self.tokens = self.mask[sel], self.next_pos[sel], self.tokens[sel]
        self.temperature, self.top_p = self.temperature[sel], self.top_p[sel]
        if self.adapter is not None:
            self.adapter = self.adapter[sel] if any(r.job.adapter for r in self.rows) else None
        if self.penalties is not None:
            if any(r.job.sampling.penalised for r in self.rows):
                self.penalties.select(sel)
            else:
                self.penalties = None
        self._drop_padding()

    def _drop_padding(self) -> None:
        first = int(self.mask.any(0).long().argmax())  # first column some row still uses
        if first:
            self.mask = self.mask[:, first:]
            for layer in cache_layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def take(self, indices: list[int]) -> "RunningBatch":
        """Split rows `indices` off into a batch of their own, with their cache, mask, position,
        next input token, sampling parameters, penalty counts and adapter; the rest stay here.
        Pre-emption parks rows this way and `join` puts them back exactly where they were:
        nothing about a row is recomputed, so its tokens and log-probs are as if never parked."""
        if not indices:
            return RunningBatch()
        taken = set(indices)
        sel = torch.tensor(indices, device=self.mask.device)
        rows = [self.rows[b] for b in indices]
        out = RunningBatch(
            rows=rows,
            cache=DynamicCache([(layer.keys[sel], layer.values[sel]) for layer in cache_layers(self.cache)]),
            mask=self.mask[sel],
            next_pos=self.next_pos[sel],
            tokens=None if self.tokens is None else self.tokens[sel],
            temperature=self.temperature[sel],
            top_p=self.top_p[sel],
        )
        if self.adapter is not None and any(r.job.adapter for r in rows):
            out.adapter = self.adapter[sel]
        if self.penalties is not None and any(r.job.sampling.penalised for r in rows):
            p = self.penalties
            out.penalties = Penalties(p.bias[sel], p.frequency[sel], p.presence[sel], p.counts[sel])
        out._drop_padding()
        self.keep([b for b in range(len(self.rows)) if b not in taken])
        return out

    def step(self, model) -> torch.Tensor:
        """One decode step: feed each row its last token; (B, V) next-token logits."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)  # (B, L+1)
        with row_adapters(model, self.adapter):
            logits = model(
                input_ids=self.tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.next_pos[:, None],
                past_key_values=self.cache,
                use_cache=True,
            ).logits[:, -1]
        self.next_pos = self.next_pos + 1
        return logits.float()

    def join(self, new: "RunningBatch", vocab: int) -> None:
        """Append `new`'s rows after this batch's: rows just prefilled (no token drawn yet:
        every row draws after the join), or parked rows coming back (`take`), whose next input
        tokens stay theirs when this batch's rows have theirs too."""
        if not self.rows:
            self.__dict__.update(new.__dict__)
            return
        width = max(self.mask.shape[1], new.mask.shape[1])
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(new.cache)):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(new.mask, width, 1)])
        self.next_pos = torch.cat([self.next_pos, new.next_pos])
        self.temperature = torch.cat([self.temperature, new.temperature])
        self.top_p = torch.cat([self.top_p, new.top_p])
        if self.adapter is not None or new.adapter is not None:
            zeros = self.next_pos.new_zeros  # (rows,) long: no adapter
            mine = self.adapter if self.adapter is not None else zeros(len(self.rows))
            theirs = new.adapter if new.adapter is not None else zeros(len(new.rows))
            self.adapter = torch.cat([mine, theirs])
        if self.penalties is not None or new.penalties is not None:
            dev = self.mask.device
            mine = self.penalties or Penalties.neutral(len(self.rows), vocab, dev)
            theirs = new.penalties or Penalties.neutral(len(new.rows), vocab, dev)
            self.penalties = mine.cat(theirs)
        self.rows += new.rows
        if self.tokens is not None and new.tokens is not None:  # parked rows back before a step
            self.tokens = torch.cat([self.tokens, new.tokens])
        else:
            self.tokens = None  # drawn for every row after the join


@dataclass
class Penalties:
    """OpenAI's frequency/presence penalties and logit_bias for a batch: the logits a
    token is drawn from are `logits + bias - frequency * count - presence * (count > 0)`,
    `count` being how often the token occurred in the sample so far (not the prompt)."""

    bias: torch.Tensor  # (B, V)
    frequency: torch.Tensor  # (B, 1)
    presence: torch.Tensor  # (B, 1)
    counts: torch.Tensor  # (B, V)

    @classmethod
    def of(cls, rows: list[Row], vocab: int, dev: torch.device) -> "Penalties | None":
        if not any(r.job.sampling.penalised for r in rows):
            return None
        bias = torch.zeros((len(rows), vocab), device=dev)
        for b, r in enumerate(rows):
            for token, value in r.job.sampling.logit_bias:
                bias[b, token] = value
        frequency = torch.tensor([[r.job.sampling.frequency_penalty] for r in rows], device=dev)
        presence = torch.tensor([[r.job.sampling.presence_penalty] for r in rows], device=dev)
        return cls(bias, frequency, presence, torch.zeros((len(rows), vocab), device=dev))

    @classmethod
    def neutral(cls, n: int, vocab: int, dev: torch.device) -> "Penalties":
        """Rows without penalties or bias, beside rows that have some."""
        zeros = torch.zeros((n, 1), device=dev)
        return cls(torch.zeros((n, vocab), device=dev), zeros, zeros.clone(), torch.zeros((n, vocab), device=dev))

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

    def cat(self, other: "Penalties") -> "Penalties":
        return Penalties(
            torch.cat([self.bias, other.bias]),
            torch.cat([self.frequency, other.frequency]),
            torch.cat([self.presence, other.presence]),
            torch.cat([self.counts, other.counts]),
        )
