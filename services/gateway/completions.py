"""POST /v1/chat/completions (streaming and not) and GET /v1/models, over gRPC Generate.

Every completion carries what feedback needs, as extra fields OpenAI clients keep:
`conversation_id` and `policy_version` at the top level (also the X-Conversation-Id and
X-Policy-Version headers) and a `response_id` per choice. Those ids resolve only once
the response is stored: before the non-streaming body is sent, before `[DONE]` in a stream.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rlhf.v1 import common_pb2, generation_pb2
from services.gateway.errors import ApiError, error_body
from services.gateway.metrics import COMPLETION_TOKENS, GENERATOR_ERRORS, INTERACTIONS, TOKENS_STREAMED
from services.gateway.schemas import ChatCompletionRequest
from services.gateway.state import Gateway

router = APIRouter()
log = logging.getLogger("gateway")

# What a caller sees for each generator failure: retryable ones as 503/504.
_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def generator_error(e: grpc.RpcError) -> ApiError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    GENERATOR_ERRORS.labels(code.name).inc()
    status = _GRPC_TO_HTTP.get(code, 502)
    if status == 400:  # the generator's own message names the parameter and limit
        return ApiError(400, f"generator refused the request: {e.details()}")
    headers = {"retry-after": "1"} if status == 503 else None
    return ApiError(status, f"generator {code.name.lower()}: {e.details() or 'no details'}", None, headers)


def _check_limits(req: ChatCompletionRequest, gw: Gateway) -> int:
    """Size limits (413) and parameter limits (422), each naming its setting; returns max_tokens."""
    s = gw.settings
    if len(req.messages) > s.max_messages:
        raise ApiError(413, f"messages: {len(req.messages)} messages; the limit is max_messages={s.max_messages}", "messages")
    chars = sum(len(m.text()) for m in req.messages)
    if chars > s.max_chars:
        raise ApiError(413, f"messages: {chars} characters of content; the limit is max_chars={s.max_chars}", "messages")
    if req.n > s.max_n:
        raise ApiError(422, f"n: {req.n} is above the limit max_n={s.max_n}", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens or s.default_max_tokens  # 0: the generator decides
    if max_tokens > s.max_tokens_limit:
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ApiError(422, f"{field}: {max_tokens} is above the limit max_tokens_limit={s.max_tokens_limit}", field)
    return max_tokens


def _generate_request(req: ChatCompletionRequest, prompt: list[dict[str, str]], max_tokens: int, request_id: str) -> generation_pb2.GenerateRequest:
    params = generation_pb2.SamplingParams(n=req.n, max_tokens=max_tokens, stop=req.stop)
    if req.temperature is not None:
        params.temperature = req.temperature
    if req.top_p is not None:
        params.top_p = req.top_p
    if req.seed is not None:
        params.seed = req.seed
    return generation_pb2.GenerateRequest(
        request_id=request_id,
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in prompt]),
        params=params,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    gw: Gateway = request.app.state.gw
    max_tokens = _check_limits(req, gw)
    prompt = [{"role": m.plain_role(), "content": m.text()} for m in req.messages]
    conversation_id = req.conversation_id or request.headers.get("x-conversation-id") or f"conv-{uuid.uuid4().hex}"
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    response_ids = [f"{completion_id}-{i}" for i in range(req.n)]
    greq = _generate_request(req, prompt, max_tokens, completion_id)
    base = {"id": completion_id, "created": int(time.time()), "model": gw.model_name, "conversation_id": conversation_id}

    if req.stream:
        return await _stream(req, gw, greq, base, prompt, response_ids)

    started = time.perf_counter()
    try:
        resp = await gw.generator.Generate(greq, timeout=gw.settings.generate_timeout_seconds)
    except grpc.RpcError as e:
        raise generator_error(e) from None
    generate_ms = 1000 * (time.perf_counter() - started)
    gw.policy_version = resp.policy_version
    samples = sorted(resp.samples, key=lambda s: s.index)
    await gw.store.record_completion(
        conversation_id, prompt, [(response_ids[s.index], s.text) for s in samples], resp.policy_version
    )
    INTERACTIONS.inc()
    COMPLETION_TOKENS.inc(resp.usage.completion_tokens)
    body = {
        **base,
        "object": "chat.completion",
        "system_fingerprint": f"policy-v{resp.policy_version}",
        "policy_version": resp.policy_version,
        "choices": [
            {
                "index": s.index,
                "message": {"role": "assistant", "content": s.text},
                "finish_reason": s.finish_reason or "stop",
                "logprobs": None,
                "response_id": response_ids[s.index],
            }
            for s in samples
        ],
        "usage": _usage(resp.usage.prompt_tokens, resp.usage.completion_tokens),
    }
    # Server-Timing: what the generator took, so a client (or benchmarks/gateway.py) can
    # tell the gateway's own share of the latency from the model's
    headers = {**_headers(conversation_id, resp.policy_version), "server-timing": f"generate;dur={generate_ms:.2f}"}
    return JSONResponse(body, headers=headers)


def _headers(conversation_id: str, policy_version: int) -> dict[str, str]:
    return {"x-conversation-id": conversation_id, "x-policy-version": str(policy_version)}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _stream(req, gw: Gateway, greq, base: dict, prompt, response_ids: list[str]) -> StreamingResponse:
    call = gw.generator.GenerateStream(greq, timeout=gw.settings.generate_timeout_seconds)
    messages = call.__aiter__()
    # Wait for the first message before answering, so a refused request is a plain HTTP error.
    try:
        first = await messages.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.RpcError as e:
        raise generator_error(e) from None
    version = first.policy_version if first is not None else gw.policy_version
    gw.policy_version = version
    head = {**base, "object": "chat.completion.chunk", "system_fingerprint": f"policy-v{version}", "policy_version": version}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None, "response_id": response_ids[index]}
        return _sse({**head, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        texts = [""] * req.n
        usage = generation_pb2.Usage()
        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            msg = first
            while msg is not None:
                if msg.text_delta or msg.finish_reason:
                    texts[msg.index] += msg.text_delta
                    delta = {"content": msg.text_delta} if msg.text_delta else {}
                    yield chunk(msg.index, delta, msg.finish_reason or None)
                    TOKENS_STREAMED.inc(len(msg.token_ids) or (1 if msg.text_delta else 0))
                if msg.HasField("usage"):
                    usage = msg.usage
                msg = await anext(messages, None)
        except grpc.RpcError as e:
            err = generator_error(e)
            yield _sse(error_body(err.status_code, str(err.detail)))
            return
        finally:
            call.cancel()
        try:
            await gw.store.record_completion(base["conversation_id"], prompt, list(zip(response_ids, texts)), version)
        except Exception:  # noqa: BLE001 - the answer went out; say it cannot be rated
            log.exception("storing a streamed answer failed")
            yield _sse(error_body(500, "the answer was not stored; feedback on it will be refused"))
            return
        INTERACTIONS.inc()
        COMPLETION_TOKENS.inc(usage.completion_tokens)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage.prompt_tokens, usage.completion_tokens)})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={**_headers(base["conversation_id"], version), "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.get("/v1/models")
async def models(request: Request) -> dict:
    gw: Gateway = request.app.state.gw
    await gw.refresh_info()
    return {
        "object": "list",
        "data": [
            {"id": gw.model_name, "object": "model", "created": gw.started, "owned_by": "rlhf", "policy_version": gw.policy_version}
        ],
    }
