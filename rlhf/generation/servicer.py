"""GenerationService over gRPC: protobuf in and out, `Generator` does the work."""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from rlhf.generation.generator import Generator
from rlhf.generation.params import sampling_from
from rlhf.generation.types import InvalidRequest, Sampling, SampleOut, WeightsRefused
from rlhf.generation.weights import FULL, LORA
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

FORMATS = {common_pb2.WEIGHT_FORMAT_FULL: FULL, common_pb2.WEIGHT_FORMAT_LORA: LORA}
FORMAT_ENUM = {v: k for k, v in FORMATS.items()}


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, generator: Generator, backend_name: str):
        self.gen = generator
        self.backend_name = backend_name

    async def _check_ready(self, context) -> None:
        if not self.gen.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the policy model is still loading")

    def _prepare(self, request: generation_pb2.GenerateRequest) -> tuple[str, list[int], Sampling]:
        which = request.WhichOneof("prompt")
        if which == "messages":
            ids = self.gen.chat_ids([{"role": m.role, "content": m.content} for m in request.messages.messages])
        elif which == "prompt_token_ids":
            ids = self.gen.check_ids(list(request.prompt_token_ids.ids))
        else:
            raise InvalidRequest("prompt", "set messages or prompt_token_ids")
        p = request.params
        sampling = sampling_from(
            n=p.n, temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None, max_tokens=p.max_tokens, stop=list(p.stop),
            seed=p.seed if p.HasField("seed") else None, prompt_len=len(ids), limits=self.gen.limits,
            ignore_eos=p.ignore_eos, priority=p.priority,
        )
        return request.request_id or uuid.uuid4().hex, ids, sampling

    async def Generate(self, request, context):
        await self._check_ready(context)
        try:
            rid, ids, sampling = self._prepare(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        samples = [SampleOut(i) for i in range(sampling.n)]
        version = self.gen.version
        async with aclosing(self.gen.generate(ids, sampling, rid, stream=False)) as stream:
            async for version, d in stream:
                samples[d.index].add(d)
        return generation_pb2.GenerateResponse(
            request_id=rid, prompt_token_ids=ids, policy_version=version,
            samples=[generation_pb2.Sample(index=s.index, text=s.text, token_ids=s.token_ids, logprobs=s.logprobs,
                                           finish_reason=s.finish_reason) for s in samples],
            usage=generation_pb2.Usage(prompt_tokens=len(ids), completion_tokens=sum(len(s.token_ids) for s in samples)),
        )

    async def GenerateStream(self, request, context) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        await self._check_ready(context)
        try:
            rid, ids, sampling = self._prepare(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        completion, finished = 0, 0
        async with aclosing(self.gen.generate(ids, sampling, rid)) as stream:
            async for version, d in stream:
                completion += len(d.token_ids)
                finished += d.finish_reason is not None
                msg = generation_pb2.GenerateStreamResponse(
                    request_id=rid, index=d.index, text_delta=d.text, token_ids=d.token_ids, logprobs=d.logprobs,
                    finish_reason=d.finish_reason or "", policy_version=version,
                )
                if finished == sampling.n:
                    msg.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=len(ids), completion_tokens=completion))
                yield msg

    async def UpdateWeights(self, request_iterator, context):
        await self._check_ready(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("chunk") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk: the first WeightChunk must carry the header")
        h = first.header
        fmt = FORMATS.get(h.format)
        if fmt is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header.format: must be WEIGHT_FORMAT_FULL or WEIGHT_FORMAT_LORA")

        async def data() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                if chunk.WhichOneof("chunk") != "data":
                    raise WeightsRefused("chunk: only the first WeightChunk may carry a header")
                yield chunk.data

        try:
            seconds = await self.gen.receive(h.version, fmt, h.sha256, h.total_bytes, h.adapter_config_json, data())
        except WeightsRefused as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"update refused, version {self.gen.version} keeps serving: {e}")
        return generation_pb2.UpdateWeightsResponse(version=self.gen.version, seconds=seconds)

    async def LoadVersion(self, request, context):
        await self._check_ready(context)
        try:
            seconds = await self.gen.load_version(request.version, request.uri, request.sha256, FORMATS.get(request.format, ""))
        except WeightsRefused as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"update refused, version {self.gen.version} keeps serving: {e}")
        return generation_pb2.UpdateWeightsResponse(version=self.gen.version, seconds=seconds)

    async def GetInfo(self, request, context):
        await self._check_ready(context)
        return generation_pb2.GeneratorInfo(
            model=self.gen.model_name, backend=self.backend_name, policy_version=self.gen.version,
            max_model_len=self.gen.limits.max_model_len, weight_format=FORMAT_ENUM[self.gen.fmt],
        )
