"""GenerationService over gRPC: protobuf in and out, `Generator` does the work.

UpdateWeights and LoadVersion need the control token (rlhf/serving/auth.py, checked by the
server's interceptor before these handlers run). Refusals are rlhf.errors exceptions, answered
with their status code by the server (rlhf/serving/server.py). A refused update keeps the
serving version: NotPublished (a version the learner did not publish) → PermissionDenied, any
other WeightsRefused (bad header, size, sha256, shapes, manifest) → InvalidArgument.

A request may name the version that answers it (`policy_version`: the stable one or the
canary's candidate; 0 = the stable one); one this generator does not serve is
FailedPrecondition naming the versions it does (rlhf/generation/gate.py)."""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from opentelemetry.trace import Span, SpanKind

from rlhf.errors import InvalidArgument, PermissionDenied, Unavailable
from rlhf.generation.generator import Generator
from rlhf.generation.params import sampling_from
from rlhf.generation.tokens import token_bytes
from rlhf.generation.types import InvalidRequest, NotPublished, SampleOut, Sampling, WeightsRefused
from rlhf.generation.weights import FULL, LORA
from rlhf.tracing import incoming_context, tracer
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

FORMATS = {common_pb2.WEIGHT_FORMAT_FULL: FULL, common_pb2.WEIGHT_FORMAT_LORA: LORA}
FORMAT_ENUM = {v: k for k, v in FORMATS.items()}


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, generator: Generator, backend_name: str):
        self.gen = generator
        self.backend_name = backend_name
        self._token_bytes: list[bytes] | None = None  # built on the first request with logprobs

    def _check_ready(self) -> None:
        if not self.gen.ready:
            raise Unavailable("the policy model is still loading")

    def _prepare(self, request: generation_pb2.GenerateRequest) -> tuple[str, list[int], Sampling]:
        if request.policy_version < 0:
            raise InvalidRequest("policy_version", f"must be ≥ 0 (0: the stable one), got {request.policy_version}")
        self.gen.gate.pick(request.policy_version)  # NotServed before the prompt is tokenised
        which = request.WhichOneof("prompt")
        if which == "messages":
            ids = self.gen.chat_ids([{"role": m.role, "content": m.content} for m in request.messages.messages])
        elif which == "prompt_token_ids":
            ids = self.gen.check_ids(list(request.prompt_token_ids.ids))
        elif which == "text":
            if not request.text:
                raise InvalidRequest("prompt", "the text prompt is empty")
            ids = self.gen.check_ids(self.gen.tokenizer.encode(request.text))
        else:
            raise InvalidRequest("prompt", "set messages, prompt_token_ids or text")
        p = request.params
        sampling = sampling_from(
            n=p.n,
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            max_tokens=p.max_tokens,
            stop=list(p.stop),
            seed=p.seed if p.HasField("seed") else None,
            prompt_len=len(ids),
            limits=self.gen.limits,
            ignore_eos=p.ignore_eos,
            priority=p.priority,
            top_logprobs=p.top_logprobs,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logit_bias=dict(p.logit_bias),
            json_object=p.json_object,
            json_schema=p.json_schema,
        )
        if p.top_logprobs and not p.logprobs:
            raise InvalidRequest("params.top_logprobs", "needs params.logprobs")
        if sampling.structured and not getattr(self.gen.backend, "structured_outputs", False):
            raise InvalidRequest(
                "params.response_format",
                f"the {self.backend_name} backend has no constrained decoding; "
                "JSON output (json_object / json_schema) needs the vLLM backend",
            )
        return request.request_id or uuid.uuid4().hex, ids, sampling

    def _tokens(self, ids: list[int], top: list[list[tuple[int, float]]]) -> list[generation_pb2.TokenDetail]:
        """OpenAI's per-token logprobs detail: each token's bytes and its top alternatives."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes(self.gen.tokenizer)
        table = self._token_bytes

        def spell(t: int) -> bytes:
            return table[t] if 0 <= t < len(table) else b""

        return [
            generation_pb2.TokenDetail(
                token=spell(t),
                top=[
                    generation_pb2.TokenLogprob(token_id=c, token=spell(c), logprob=lp)
                    for c, lp in (top[i] if i < len(top) else [])
                ],
            )
            for i, t in enumerate(ids)
        ]

    def _span(self, name: str, context) -> Span:
        """The RPC's span, a child of the caller's (its `traceparent` metadata, rlhf/tracing.py)."""
        return tracer.start_span(name, context=incoming_context(context.invocation_metadata()), kind=SpanKind.SERVER)

    def _trace_request(self, span: Span, rid: str, ids: list[int], sampling: Sampling) -> None:
        span.set_attributes(
            {
                "rlhf.request_id": rid,
                "gen_ai.request.model": self.gen.model_name,
                "gen_ai.request.choice.count": sampling.n,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.usage.input_tokens": len(ids),
                "rlhf.priority": sampling.priority,
            }
        )

    @staticmethod
    def _trace_result(span: Span, version: int, completion_tokens: int, finish_reasons: list[str]) -> None:
        span.set_attributes(
            {
                "rlhf.policy_version": version,
                "gen_ai.usage.output_tokens": completion_tokens,
                "gen_ai.response.finish_reasons": finish_reasons,
            }
        )

    async def Generate(self, request, context):
        self._check_ready()
        with self._span("generate", context) as span:
            rid, ids, sampling = self._prepare(request)
            self._trace_request(span, rid, ids, sampling)
            samples = [SampleOut(i) for i in range(sampling.n)]
            version = self.gen.version
            gen = self.gen.generate(ids, sampling, rid, stream=False, version=request.policy_version)
            async with aclosing(gen) as stream:
                async for chunk_version, d in stream:
                    version = chunk_version  # the response names the version of the last chunk
                    samples[d.index].add(d)
            completion = sum(len(s.token_ids) for s in samples)
            self._trace_result(span, version, completion, [s.finish_reason for s in samples])
        return generation_pb2.GenerateResponse(
            request_id=rid,
            prompt_token_ids=ids,
            policy_version=version,
            samples=[
                generation_pb2.Sample(
                    index=s.index,
                    text=s.text,
                    token_ids=s.token_ids,
                    logprobs=s.logprobs,
                    finish_reason=s.finish_reason,
                    tokens=self._tokens(s.token_ids, s.top) if request.params.logprobs else None,
                )
                for s in samples
            ],
            usage=generation_pb2.Usage(prompt_tokens=len(ids), completion_tokens=completion),
        )

    async def GenerateStream(self, request, context) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        self._check_ready()
        with self._span("generate", context) as span:
            rid, ids, sampling = self._prepare(request)
            self._trace_request(span, rid, ids, sampling)
            span.set_attribute("rlhf.stream", True)
            completion, finished, version = 0, 0, self.gen.version
            reasons = [""] * sampling.n
            async with aclosing(self.gen.generate(ids, sampling, rid, version=request.policy_version)) as stream:
                async for version, d in stream:
                    completion += len(d.token_ids)
                    finished += d.finish_reason is not None
                    if d.finish_reason:
                        reasons[d.index] = d.finish_reason
                    msg = generation_pb2.GenerateStreamResponse(
                        request_id=rid,
                        index=d.index,
                        text_delta=d.text,
                        token_ids=d.token_ids,
                        logprobs=d.logprobs,
                        finish_reason=d.finish_reason or "",
                        policy_version=version,
                        tokens=self._tokens(d.token_ids, d.top) if request.params.logprobs else None,
                    )
                    if finished == sampling.n:
                        msg.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=len(ids), completion_tokens=completion))
                        self._trace_result(span, version, completion, reasons)
                    yield msg

    async def UpdateWeights(self, request_iterator, context):
        self._check_ready()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("chunk") != "header":
            raise InvalidRequest("chunk", "the first WeightChunk must carry the header")
        h = first.header
        fmt = FORMATS.get(h.format)
        if fmt is None:
            raise InvalidRequest("header.format", "must be WEIGHT_FORMAT_FULL or WEIGHT_FORMAT_LORA")

        async def data() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                if chunk.WhichOneof("chunk") != "data":
                    raise WeightsRefused("chunk: only the first WeightChunk may carry a header")
                yield chunk.data

        try:
            seconds = await self.gen.receive(h.version, fmt, h.sha256, h.total_bytes, h.adapter_config_json, data())
        except WeightsRefused as e:
            raise self._refused(e) from e
        return generation_pb2.UpdateWeightsResponse(version=self.gen.version, seconds=seconds)

    async def LoadVersion(self, request, context):
        self._check_ready()
        try:
            seconds = await self.gen.load_version(
                request.version, request.uri, request.sha256, FORMATS.get(request.format, "")
            )
        except WeightsRefused as e:
            raise self._refused(e) from e
        return generation_pb2.UpdateWeightsResponse(version=self.gen.version, seconds=seconds)

    def _refused(self, e: WeightsRefused) -> PermissionDenied | InvalidArgument:
        kind = PermissionDenied if isinstance(e, NotPublished) else InvalidArgument
        return kind(f"update refused, version {self.gen.version} keeps serving: {e}")

    async def GetInfo(self, request, context):
        self._check_ready()
        return generation_pb2.GeneratorInfo(
            model=self.gen.model_name,
            backend=self.backend_name,
            policy_version=self.gen.version,
            max_model_len=self.gen.limits.max_model_len,
            weight_format=FORMAT_ENUM[self.gen.fmt],
            candidate_version=self.gen.candidate_version,
            canary_share=self.gen.canary_share,
        )
