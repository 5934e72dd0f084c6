"""vLLM backend: the async engine (continuous batching), weights swapped in place through
a worker extension, LoRA adapters through vLLM's own multi-LoRA support.

A full update is read into memory by the workers while the old weights serve (and its
sha256 is checked), then drains (the gate waits for in-flight requests), is loaded in place
and clears the prefix cache, whose KV blocks were computed by the old weights. A
LoRA update needs no drain: the adapter is pre-loaded, then new requests name it in their
`LoRARequest` while requests already running finish on theirs.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from rlhf.generation.backend import Backend
from rlhf.generation.metrics import RequestStats
from rlhf.generation.types import Delta, Sampling, WeightsRefused
from rlhf.generation.weights import FULL, WeightUpdate

log = logging.getLogger(__name__)

EXTENSION = "rlhf.generation.vllm_worker.WeightSwapExtension"
MAX_LORAS = 3  # LoRA adapters one batch may mix (vLLM max_loras): stable, candidate, one being replaced


class VllmBackend(Backend):
    name = "vllm"
    structured_outputs = True  # SamplingParams.structured_outputs (xgrammar / guidance)

    def __init__(
        self,
        model_dir: Path,
        max_model_len: int,
        max_batch: int,
        dtype: str = "auto",
        enable_lora: bool = True,
        max_lora_rank: int = 16,
        enforce_eager: bool = True,
        kv_cache_gib: float = 1.0,
        seed: int = 0,
    ):
        self.model_dir = Path(model_dir)
        self.engine_kwargs = dict(
            model=str(model_dir),
            max_model_len=max_model_len,
            max_num_seqs=max_batch,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            worker_extension_cls=EXTENSION,
            enable_lora=enable_lora,
            scheduling_policy="priority",  # SamplingParams.priority: people first
            # adapters in one batch: the stable version's, a canary candidate's (issue 15), and
            # the one in-flight requests still use while either is replaced
            **({"max_lora_rank": max_lora_rank, "max_loras": MAX_LORAS} if enable_lora else {}),
        )
        self.kv_cache_gib = kv_cache_gib
        self._lora_ids = itertools.count(1)
        self.engine = None

    async def start(self) -> None:
        # The engine runs in child processes. Spawn, not fork: this process already runs
        # gRPC threads, which do not survive a fork (hence the __main__ guard in services).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.kv_cache_gib))))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs))

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        handle: Any,
        stream: bool = True,
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            # the sampled token's own log-prob (and the top k), from the raw logits (logprobs_mode default)
            logprobs=sampling.top_logprobs,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            structured_outputs=_structured(sampling),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            skip_special_tokens=True,
            ignore_eos=sampling.ignore_eos,
        )
        stream = self.engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)),
            params,
            request_id,
            lora_request=handle,
            priority=sampling.priority,
        )
        stats = RequestStats(sampling.priority)
        try:
            async for out in stream:
                for c in out.outputs:
                    ids = list(c.token_ids)
                    lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)] if ids else []
                    top = []
                    if sampling.top_logprobs and ids:
                        # each step's dict holds the top k and the sampled token; rank 1 = most likely
                        for i in range(len(ids)):
                            ranked = sorted(c.logprobs[i].items(), key=lambda kv: kv[1].rank or 0)
                            top.append([(int(t), float(lp.logprob)) for t, lp in ranked[: sampling.top_logprobs]])
                    finish = c.finish_reason if c.finish_reason in ("stop", "length") else None
                    if c.finish_reason == "abort":
                        raise RuntimeError(f"vLLM aborted request {request_id}")
                    if finish:
                        stats.engine_sample(c.index, *_engine_times(out.metrics))
                    if ids or c.text or finish:
                        yield Delta(c.index, ids, lps, c.text, finish, top)
        finally:
            stats.done()

    def drains(self, update: WeightUpdate) -> bool:
        return update.fmt == FULL

    async def prepare(self, update: WeightUpdate) -> Any:
        if update.fmt == FULL:
            await self.engine.collective_rpc("rlhf_stage_weights", args=([str(p) for p in update.files],))
            return update
        from vllm.lora.request import LoRARequest

        # A fresh id per load: vLLM caches adapters by id, and a version may be re-sent.
        request = LoRARequest(f"policy-v{update.version}", next(self._lora_ids), str(update.folder))
        try:
            await self.engine.add_lora(request)
        except Exception as e:  # noqa: BLE001 - the engine's refusal is the caller's answer
            raise WeightsRefused(f"vLLM refused the LoRA adapter: {e}") from e
        return request

    async def discard(self, prepared: Any) -> None:
        if isinstance(prepared, WeightUpdate):
            await self.engine.collective_rpc("rlhf_drop_staged")
        else:
            await self.engine.remove_lora(prepared.lora_int_id)

    async def activate(self, prepared: Any) -> Any:
        if isinstance(prepared, WeightUpdate):
            await self.engine.collective_rpc("rlhf_commit_staged")
            # cached KV blocks were computed by the old weights
            await self.engine.reset_prefix_cache()
            return None
        return prepared

    # --- the canary's candidate: one more LoRARequest (vLLM multi-LoRA batches) ----------

    async def prepare_candidate(self, update: WeightUpdate) -> Any:
        if update.fmt == FULL:
            raise WeightsRefused(
                f"version {update.version} is a full-weight candidate; the vLLM engine holds one set of full "
                "weights, so a candidate beside the stable version must be a LoRA adapter"
            )
        if not self.engine_kwargs.get("enable_lora"):
            raise WeightsRefused("this generator runs with enable_lora=false: no LoRA candidate")
        return await self.prepare(update)

    async def activate_candidate(self, prepared: Any) -> Any:
        return prepared  # requests that name the candidate carry its LoRARequest

    async def drop_candidate(self, handle: Any) -> None:
        try:
            await self.engine.remove_lora(handle.lora_int_id)
        except Exception:  # noqa: BLE001 - an adapter vLLM already evicted is gone anyway
            log.warning("removing the candidate's LoRA adapter failed", exc_info=True)

    def promote_drains(self) -> bool:
        return False  # the adapter is already loaded: new stable requests simply name it

    async def promote_candidate(self, handle: Any) -> Any:
        return handle


def _engine_times(m: Any) -> tuple[float, float, float]:
    """(queue, first-token, per-output-token seconds) from vLLM's per-request stats, -1 where
    it kept none (stats logging off). Its timestamps are the engine core's monotonic clock;
    with n > 1 they are those of the sample that finished last."""
    if m is None or not getattr(m, "scheduled_ts", 0):
        return -1.0, -1.0, -1.0
    queue = m.scheduled_ts - m.queued_ts
    ttft = m.first_token_latency if m.first_token_latency > 0 else -1.0
    n = m.num_generation_tokens
    tpot = (m.last_token_ts - m.first_token_ts) / (n - 1) if n > 1 else -1.0
    return queue, ttft, tpot


def _structured(sampling: Sampling) -> Any:
    """vLLM's structured-outputs parameters for a JSON request, else None."""
    if not sampling.structured:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    if sampling.json_schema:
        return StructuredOutputsParams(json=json.loads(sampling.json_schema))
    return StructuredOutputsParams(json_object=True)
