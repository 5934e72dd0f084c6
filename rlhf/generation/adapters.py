"""Per-row LoRA adapters in one forward pass: the transformers backend's canary candidate.

During a canary (issue 15) the generator serves a stable version and a candidate at once.
The stable version stays merged in the model's weights, as it always was; a LoRA candidate
is applied per row instead, so its rows decode in the same batch and the same forward pass
as the stable rows. A forward hook on each adapted `nn.Linear` adds, for the rows whose
adapter id is k only,

    y += ((x Aₖᵀ) · mₖ) Bₖᵀ        mₖ = 1 on the rows of adapter k, 0 elsewhere

with Aₖ (r, in) and Bₖ (out, r) the adapter's factors (B already times α/r). A candidate
that, like the stable version, is a LoRA of the same initial weights needs
W₀ + ΔC = (W₀ + ΔS) + ΔC − ΔS: its factors are C's and S's stacked along the rank,
A = [A_C; A_S], B = [B_C, −B_S] (rank r_C + r_S), so the difference from the merged stable
weights is still two low-rank products (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"). The rows of the stable version pay nothing: a forward in which no row
has an adapter skips the hooks' work, and the hook's cost otherwise is O(r) per row.

Adapters are added and removed from any thread; the change is applied on the engine thread
at the start of the next forward (`rows`), never during one, so loading a candidate drains
nothing: the running stable rows go on decoding.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from rlhf.generation.types import WeightsRefused

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A (r, in), B (out, r) scaled)

_ATTR = "_rlhf_row_adapters"


def relative_to(candidate: Factors, stable: Factors | None) -> Factors:
    """The candidate's factors minus the merged stable adapter's: C − S stacked along the rank."""
    if not stable:
        return dict(candidate)
    out: Factors = {}
    for module in sorted(set(candidate) | set(stable)):
        parts = [candidate[module]] if module in candidate else []
        if module in stable:
            a, b = stable[module]
            parts.append((a, -b))
        out[module] = (torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts], dim=1))
    return out


class RowAdapters:
    """The LoRA adapters resident in one model, each applied only to the rows that name it."""

    def __init__(self, model: nn.Module, stable: Factors | None = None):
        self.model = model
        self.modules = dict(model.named_modules())
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._own: dict[int, Factors] = {}  # adapter id → its own factors (ΔW of the adapter)
        self._stable = stable  # the adapter merged into the weights now, if any
        self._live: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # id → module → (Aᵀ, Bᵀ)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._ops: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._masks: dict[int, torch.Tensor] = {}  # during a forward: id → (B, 1, 1) row mask
        setattr(model, _ATTR, self)

    @classmethod
    def of(cls, model: nn.Module, stable: Factors | None = None) -> "RowAdapters":
        """The model's adapters; made on first use, `stable` being the LoRA merged in its weights."""
        return getattr(model, _ATTR, None) or cls(model, stable)

    # --- changes (any thread; applied at the next forward) ----------------------------

    def check(self, factors: Factors) -> None:
        """Refuse an adapter whose modules are not linear layers of this model."""
        for module in factors:
            if not isinstance(self.modules.get(module), nn.Linear):
                raise WeightsRefused(f"LoRA targets {module}, which is not an nn.Linear of the model")

    def add(self, factors: Factors) -> int:
        """Make `factors` (the adapter's own, relative to the initial weights) resident; its id."""
        self.check(factors)
        adapter = next(self._ids)
        self._queue(lambda: self._set(adapter, factors))
        return adapter

    def remove(self, adapter: int) -> None:
        self._queue(lambda: self._drop(adapter))

    def merged(self, stable: Factors | None) -> None:
        """The weights now hold the initial weights plus `stable` (None: no LoRA merged):
        every resident adapter is re-expressed against them. Call on the engine thread, with
        no forward running (the backend's weight swap)."""
        self._stable = stable
        for adapter, own in self._own.items():
            self._build(adapter, own)

    def factors(self, adapter: int) -> Factors:
        return self._own[adapter]

    def _queue(self, op: Callable[[], None]) -> None:
        with self._lock:
            self._ops.append(op)

    def apply_pending(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for op in ops:
            op()

    def _set(self, adapter: int, own: Factors) -> None:
        self._own[adapter] = own
        self._build(adapter, own)

    def _build(self, adapter: int, own: Factors) -> None:
        rel = relative_to(own, self._stable)
        self._live[adapter] = {
            m: (a.T.to(self.device, self.dtype).contiguous(), b.T.to(self.device, self.dtype).contiguous())
            for m, (a, b) in rel.items()
        }
        for m in rel:
            if m not in self._hooks:
                self._hooks[m] = self.modules[m].register_forward_hook(self._hook(m))

    def _drop(self, adapter: int) -> None:
        self._own.pop(adapter, None)
        self._live.pop(adapter, None)
        used = {m for live in self._live.values() for m in live}
        for m in list(self._hooks):
            if m not in used:
                self._hooks.pop(m).remove()

    # --- forward ----------------------------------------------------------------------

    @contextmanager
    def rows(self, ids: torch.Tensor | None) -> Iterator[None]:
        """A forward of a batch whose row b runs adapter `ids[b]` (0: none, the stable weights)."""
        self.apply_pending()
        present = [] if ids is None else [k for k in self._live if bool((ids == k).any())]
        if not present:
            yield
            return
        self._masks = {k: (ids == k).to(self.dtype)[:, None, None] for k in present}
        try:
            yield
        finally:
            self._masks = {}

    def _hook(self, module: str):
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self._masks:
                return None
            x = args[0]  # (B, T, in)
            for adapter, mask in self._masks.items():
                f = self._live.get(adapter, {}).get(module)
                if f is not None:
                    a_t, b_t = f
                    out = out + ((x @ a_t) * mask) @ b_t  # (B, T, r) → (B, T, out)
            return out

        return hook


@contextmanager
def row_adapters(model: nn.Module, ids: torch.Tensor | None) -> Iterator[None]:
    """`RowAdapters.rows` of `model` if it has any adapters, else nothing."""
    adapters = getattr(model, _ATTR, None)
    if adapters is None:
        yield
        return
    with adapters.rows(ids):
        yield
