"""POST /v1/chat/completions and /v1/completions (streaming and not), GET /v1/models and
/v1/models/{id}, over gRPC Generate.

OpenAI's `logprobs` / `top_logprobs` come from the generator (each sampled token's raw
log-prob, its bytes and the k most likely tokens at its step); `frequency_penalty`,
`presence_penalty` and `logit_bias` change sampling in the generator; `response_format`
json_object / json_schema go to vLLM's structured outputs, and the transformers backend
refuses them (a 400 naming `response_format`).

Every completion carries what feedback needs, as extra fields OpenAI clients keep:
`conversation_id` and `policy_version` at the top level (also the X-Conversation-Id and
X-Policy-Version headers) and a `response_id` per choice. Those ids resolve only once
the response is stored: before the non-streaming body is sent, before `[DONE]` in a stream.

A comparison (n=2) with compare_candidates = k > 2 and compare_selection other than
"first" samples k answers and shows the two services/gateway/compare.py picks; a stream
then carries each chosen answer whole (the pick needs all k finished). Only the two shown
are stored and published: an Interaction says what a person saw, and feedback can only
name what was shown (an unseen candidate's id does not exist).

The canary (issue 15, docs/canary.md): each chat and text completion names the version that
answers (`GenerateRequest.policy_version`, from the conversation's pin or the sticky split,
services/gateway/state.py), and every choice reports the version that wrote it
(`choices[i].policy_version`, beside the top-level `policy_version`). While a candidate
runs, canary_compare_share of comparisons (n=2) are cross-version: one answer of each
version (two n=1 calls at once), shown in random order, each stored and published with its
own version — two Interaction events, one per answer — so a pick between them is a
head-to-head between the versions. A version that stopped being served between GetInfo and
the call (FAILED_PRECONDITION from the generator) is asked for once more as the stable one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from typing import AsyncIterator, Callable

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace

from rlhf import tracing
from rlhf.v1 import common_pb2, generation_pb2
from services.gateway.body import JsonRoute
from services.gateway.compare import pick_best, pick_pair
from services.gateway.errors import ApiError, error_body
from services.gateway.metrics import (
    BEST_OF_SELECTIONS,
    CANARY_COMPARISONS,
    COMPARE_SELECTIONS,
    COMPLETION_TOKENS,
    GENERATOR_ERRORS,
    INTERACTIONS,
    REQUESTS_BY_VERSION,
    TOKENS_STREAMED,
)
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from services.gateway.state import Gateway

router = APIRouter(route_class=JsonRoute)
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
        details = e.details() or ""
        return ApiError(400, f"generator refused the request: {details}", _request_field(details))
    headers = {"retry-after": "1"} if status == 503 else None
    return ApiError(status, f"generator {code.name.lower()}: {e.details() or 'no details'}", None, headers)


def _request_field(details: str) -> str:
    """The request field behind the generator's "params.max_tokens: ..." / "prompt: ..."."""
    name = details.partition(":")[0].strip()
    if name.startswith("params."):
        return name.removeprefix("params.")
    if name == "prompt":  # the conversation, rendered and tokenised
        return "messages"
    return name if name.startswith("messages") else "body"


def _completion_field(details: str) -> str:
    """As _request_field, for /v1/completions (whose prompt is `prompt`)."""
    field = _request_field(details)
    return "prompt" if field == "messages" else field


def _check_limits(req: ChatCompletionRequest, gw: Gateway) -> int:
    """Size limits (413) and parameter limits (400, as OpenAI), each naming its setting; returns max_tokens."""
    s = gw.settings
    if len(req.messages) > s.max_messages:
        raise ApiError(
            413, f"messages: {len(req.messages)} messages; the limit is max_messages={s.max_messages}", "messages"
        )
    chars = sum(len(m.text()) for m in req.messages)
    if chars > s.max_chars:
        raise ApiError(
            413, f"messages: {chars} characters of content; the limit is max_chars={s.max_chars}", "messages"
        )
    return _check_n_and_tokens(req.n, req.max_completion_tokens, req.max_tokens, gw)


def _check_n_and_tokens(n: int, max_completion_tokens: int | None, max_tokens_: int | None, gw: Gateway) -> int:
    s = gw.settings
    if n > s.max_choices:
        raise ApiError(400, f"n: {n} is above the limit max_choices={s.max_choices}", "n")
    max_tokens = max_completion_tokens or max_tokens_ or s.default_max_completion_tokens  # 0: the generator decides
    if max_tokens > s.max_tokens_limit:
        field = "max_completion_tokens" if max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{field}: {max_tokens} is above the limit max_tokens_limit={s.max_tokens_limit}", field)
    return max_tokens


def _candidates(req: ChatCompletionRequest, gw: Gateway) -> int:
    """Samples to draw: compare_candidates for a comparison the gateway picks a pair of,
    serve_best_of for a one-answer chat it reranks, else n."""
    s = gw.settings
    if req.n == 2 and s.compare_candidates > 2 and s.compare_selection != "first":
        return s.compare_candidates
    if req.n == 1 and s.serve_best_of > 1:
        return s.serve_best_of
    return req.n


def _generate_request(
    req: ChatCompletionRequest, prompt: list[dict[str, str]], max_tokens: int, request_id: str, n: int
) -> generation_pb2.GenerateRequest:
    params = _sampling_params(req, max_tokens, n)
    params.logprobs = bool(req.logprobs)
    params.top_logprobs = req.top_logprobs or 0
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        params.json_object = True
    elif fmt is not None and fmt.type == "json_schema":
        params.json_schema = fmt.schema_text()
    return generation_pb2.GenerateRequest(
        request_id=request_id,
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in prompt]),
        params=params,
    )


def _sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, n: int):
    """What both endpoints share: sampling, penalties and biases."""
    params = generation_pb2.SamplingParams(n=n, max_tokens=max_tokens, stop=req.stop)
    if req.temperature is not None:
        params.temperature = req.temperature
    if req.top_p is not None:
        params.top_p = req.top_p
    if req.seed is not None:
        params.seed = req.seed
    params.frequency_penalty = req.frequency_penalty or 0.0
    params.presence_penalty = req.presence_penalty or 0.0
    for token, bias in (req.logit_bias or {}).items():
        params.logit_bias[token] = bias
    return params


def _token_text(b: bytes) -> str:
    """A token's text; a token that is part of a UTF-8 character is spelled as its bytes
    ("bytes:\\xf0\\x9f"), as OpenAI-compatible servers do (`bytes` has the exact values)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _logprobs_content(logprobs, tokens) -> list[dict]:
    """OpenAI's `choices[i].logprobs.content`: one entry per sampled token."""
    return [
        {
            "token": _token_text(t.token),
            "logprob": lp,
            "bytes": list(t.token),
            "top_logprobs": [
                {"token": _token_text(c.token), "logprob": c.logprob, "bytes": list(c.token)} for c in t.top
            ],
        }
        for lp, t in zip(logprobs, tokens)
    ]


def _choice_logprobs(req: ChatCompletionRequest, logprobs, tokens) -> dict | None:
    if not req.logprobs:
        return None
    return {"content": _logprobs_content(logprobs, tokens), "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _trace_usage(span: trace.Span, usage: generation_pb2.Usage, policy_version: int) -> None:
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "rlhf.policy_version": policy_version,
        }
    )


@router.post("/v1/chat/completions")
@tracing.http_span("chat.completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    gw: Gateway = request.app.state.gw
    span = trace.get_current_span()
    span.set_attributes(
        {"gen_ai.operation.name": "chat", "gen_ai.request.choice.count": req.n, "rlhf.stream": req.stream}
    )
    max_tokens = _check_limits(req, gw)
    prompt = [{"role": m.plain_role(), "content": m.text()} for m in req.messages]
    conversation_id = req.conversation_id or request.headers.get("x-conversation-id") or f"conv-{uuid.uuid4().hex}"
    # made of the chat's trace and span ids when tracing is on: its response ids lead to the trace
    completion_id = tracing.request_id("chatcmpl", span)
    response_ids = [f"{completion_id}-{i}" for i in range(req.n)]
    span.set_attributes(
        {
            "gen_ai.request.model": gw.model_name,
            "gen_ai.conversation.id": conversation_id,
            "gen_ai.response.id": completion_id,
            "rlhf.response_ids": response_ids,
        }
    )
    k = _candidates(req, gw)
    greq = _generate_request(req, prompt, max_tokens, completion_id, k)
    greq.policy_version = await gw.version_for(conversation_id)
    base = {
        "id": completion_id,
        "created": int(time.time()),
        "model": gw.model_name,
        "conversation_id": conversation_id,
    }

    if req.n == 2 and gw.candidate_version:
        cross = random.random() < gw.settings.canary_compare_share
        CANARY_COMPARISONS.labels("cross" if cross else "same").inc()
        if cross:
            greq.params.n = 1
            return await _cross_compare(req, gw, greq, base, prompt, response_ids)

    if req.stream and k == req.n:
        return await _stream(req, gw, greq, base, prompt, response_ids)

    started = time.perf_counter()
    try:
        resp = await _generate(gw, greq, conversation_id)
    except grpc.RpcError as e:
        raise generator_error(e) from None
    generate_ms = 1000 * (time.perf_counter() - started)
    _served(gw, conversation_id, resp.policy_version)
    _trace_usage(span, resp.usage, resp.policy_version)
    samples = sorted(resp.samples, key=lambda s: s.index)
    extra_headers: dict[str, str] = {}
    if k != req.n:
        samples, extra_headers = await (_pick(gw, prompt, samples) if req.n == 2 else _best(gw, prompt, samples))
    if req.stream:
        return await _stream_whole(req, gw, base, prompt, response_ids, samples, resp, extra_headers)
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
                "logprobs": _choice_logprobs(req, s.logprobs, s.tokens),
                "response_id": response_ids[s.index],
                "policy_version": resp.policy_version,
            }
            for s in samples
        ],
        "usage": _usage(resp.usage.prompt_tokens, resp.usage.completion_tokens),
    }
    # Server-Timing: what the generator took, so a client (or benchmarks/gateway.py) can
    # tell the gateway's own share of the latency from the model's
    headers = {
        **_headers(conversation_id, resp.policy_version),
        "server-timing": f"generate;dur={generate_ms:.2f}",
        **extra_headers,
    }
    return JSONResponse(body, headers=headers)


async def _generate(gw: Gateway, greq, conversation_id: str | None):
    """Generate, asking once more for the stable version (0) when the version named is no
    longer served (a canary decision landed since the last GetInfo)."""
    timeout, metadata = gw.settings.generate_timeout_seconds, tracing.outgoing_metadata()
    try:
        return await gw.generator.Generate(greq, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        if not _version_gone(e, greq):
            raise
    await _version_refused(gw, greq, conversation_id)
    return await gw.generator.Generate(greq, timeout=timeout, metadata=metadata)


def _version_gone(e: grpc.RpcError, greq) -> bool:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    return code == grpc.StatusCode.FAILED_PRECONDITION and greq.policy_version != 0


async def _version_refused(gw: Gateway, greq, conversation_id: str | None) -> None:
    log.info("version no longer served; asking for the stable one", extra={"policy_version": greq.policy_version})
    if conversation_id:
        gw.unpin(conversation_id)
    await gw.refresh_info()
    greq.policy_version = 0


def _served(gw: Gateway, conversation_id: str | None, version: int) -> None:
    """What answered: remembered for the conversation's next turn, counted by role."""
    gw.policy_version = version if gw.role(version) == "stable" else gw.policy_version
    if conversation_id:
        gw.pin(conversation_id, version)
    REQUESTS_BY_VERSION.labels(gw.role(version)).inc()


async def _cross_compare(req, gw: Gateway, greq, base: dict, prompt, response_ids: list[str]):
    """A comparison of the candidate against stable: one n=1 answer from each, at once, shown
    in random order; each answer stored (and published) with its own version."""
    stable, candidate = gw.policy_version, gw.candidate_version
    calls = []
    for version in (stable, candidate):
        one = generation_pb2.GenerateRequest()
        one.CopyFrom(greq)
        one.policy_version = version
        one.request_id = f"{greq.request_id}-v{version}"
        calls.append(one)
    started = time.perf_counter()
    try:
        answers = await asyncio.gather(*(_generate(gw, one, None) for one in calls))
    except grpc.RpcError as e:
        raise generator_error(e) from None
    generate_ms = 1000 * (time.perf_counter() - started)
    if random.random() < 0.5:
        answers = answers[::-1]
    samples, versions = [], []
    for index, resp in enumerate(answers):
        copy = generation_pb2.Sample()
        copy.CopyFrom(resp.samples[0])
        copy.index = index
        samples.append(copy)
        versions.append(resp.policy_version)
        REQUESTS_BY_VERSION.labels(gw.role(resp.policy_version)).inc()
    usage = generation_pb2.Usage(
        prompt_tokens=answers[0].usage.prompt_tokens,
        completion_tokens=sum(a.usage.completion_tokens for a in answers),
    )
    cid = base["conversation_id"]
    for sample, version in zip(samples, versions):
        await gw.store.record_completion(cid, prompt, [(response_ids[sample.index], sample.text)], version)
    INTERACTIONS.inc(2)
    COMPLETION_TOKENS.inc(usage.completion_tokens)
    _trace_usage(trace.get_current_span(), usage, stable)
    headers = {
        **_headers(cid, stable),
        "x-policy-versions": ",".join(str(v) for v in versions),
        "x-compare-versions": "cross",
        "server-timing": f"generate;dur={generate_ms:.2f}",
    }
    if req.stream:
        resp = generation_pb2.GenerateResponse(policy_version=stable, usage=usage)
        return await _stream_whole(req, gw, base, prompt, response_ids, samples, resp, headers, versions=versions)
    body = {
        **base,
        "object": "chat.completion",
        "system_fingerprint": f"policy-v{stable}",
        "policy_version": stable,
        "policy_versions": versions,
        "choices": [
            {
                "index": s.index,
                "message": {"role": "assistant", "content": s.text},
                "finish_reason": s.finish_reason or "stop",
                "logprobs": _choice_logprobs(req, s.logprobs, s.tokens),
                "response_id": response_ids[s.index],
                "policy_version": v,
            }
            for s, v in zip(samples, versions)
        ],
        "usage": _usage(usage.prompt_tokens, usage.completion_tokens),
    }
    return JSONResponse(body, headers=headers)


async def _pick(gw: Gateway, prompt, samples: list) -> tuple[list, dict[str, str]]:
    """The two of `samples` (sorted by index) to show, re-indexed 0 and 1, and headers that
    say which were picked: x-compare-selection (the selection that applied) and
    x-compare-picked ("i,j", the candidates' sample indices)."""
    s = gw.settings
    (i, j), applied = await pick_pair(
        s.compare_selection, prompt, [x.text for x in samples], gw.reward, s.score_timeout_seconds
    )
    COMPARE_SELECTIONS.labels(applied).inc()
    shown = []
    for new_index, old in enumerate((samples[i], samples[j])):
        copy = generation_pb2.Sample()
        copy.CopyFrom(old)
        copy.index = new_index
        shown.append(copy)
    headers = {
        "x-compare-selection": applied,
        "x-compare-candidates": str(len(samples)),
        "x-compare-picked": f"{i},{j}",
    }
    return shown, headers


async def _best(gw: Gateway, prompt, samples: list) -> tuple[list, dict[str, str]]:
    """The one of `samples` the reward model scores highest, re-indexed 0, and headers that
    say so: x-best-of (how many were sampled), x-best-of-selection (rm_best, or first when
    the RM could not score), x-best-of-picked (its sample index)."""
    i, applied = await pick_best(prompt, [x.text for x in samples], gw.reward, gw.settings.score_timeout_seconds)
    BEST_OF_SELECTIONS.labels(applied).inc()
    copy = generation_pb2.Sample()
    copy.CopyFrom(samples[i])
    copy.index = 0
    return [copy], {"x-best-of": str(len(samples)), "x-best-of-selection": applied, "x-best-of-picked": str(i)}


async def _stream_whole(
    req,
    gw: Gateway,
    base: dict,
    prompt,
    response_ids: list[str],
    samples: list,
    resp,
    extra_headers: dict[str, str],
    versions: list[int] | None = None,
) -> StreamingResponse:
    """An SSE stream of answers already generated: each choice's text in one chunk.
    `versions`: each sample's version, when they differ (a cross-version comparison, stored
    by the caller); else all are resp.policy_version and stored here."""
    version = resp.policy_version
    head = {
        **base,
        "object": "chat.completion.chunk",
        "system_fingerprint": f"policy-v{version}",
        "policy_version": version,
    }
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if versions is None:
        await gw.store.record_completion(
            base["conversation_id"], prompt, [(response_ids[x.index], x.text) for x in samples], version
        )
        INTERACTIONS.inc()
        COMPLETION_TOKENS.inc(resp.usage.completion_tokens)
        versions = [version] * len(samples)
    version_of = {x.index: v for x, v in zip(samples, versions)}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": logprobs,
            "response_id": response_ids[index],
            "policy_version": version_of[index],
        }
        return _sse({**head, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        for x in samples:
            yield chunk(x.index, {"role": "assistant", "content": ""})
        for x in samples:
            if x.text or (req.logprobs and x.token_ids):
                yield chunk(x.index, {"content": x.text}, logprobs=_choice_logprobs(req, x.logprobs, x.tokens))
                TOKENS_STREAMED.inc(len(x.token_ids) or 1)
            yield chunk(x.index, {}, x.finish_reason or "stop")
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(resp.usage.prompt_tokens, resp.usage.completion_tokens)})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={
            **_headers(base["conversation_id"], version),
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **extra_headers,
        },
    )


def _headers(conversation_id: str, policy_version: int) -> dict[str, str]:
    return {"x-conversation-id": conversation_id, "x-policy-version": str(policy_version)}


def _event_stream(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies (nginx's x-accel-buffering) and caches."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _open_stream(
    gw: Gateway, greq, to_api_error: Callable[[grpc.RpcError], ApiError], conversation_id: str | None = None
):
    """Start a GenerateStream and wait for its first message before answering, so a refused
    request is a plain HTTP error (`to_api_error`) rather than an error inside a 200 stream;
    a version no longer served is asked for once more as the stable one (as `_generate`).
    Returns (call, the message iterator, the first message or None, the policy version)."""
    for attempt in (0, 1):
        call = gw.generator.GenerateStream(
            greq, timeout=gw.settings.generate_timeout_seconds, metadata=tracing.outgoing_metadata()
        )
        messages = call.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            first = None
        except grpc.RpcError as e:
            if attempt == 0 and _version_gone(e, greq):
                await _version_refused(gw, greq, conversation_id)
                continue
            raise to_api_error(e) from None
        break
    version = first.policy_version if first is not None else gw.policy_version
    _served(gw, conversation_id, version)
    return call, messages, first, version


async def _stream(req, gw: Gateway, greq, base: dict, prompt, response_ids: list[str]) -> StreamingResponse:
    span = trace.get_current_span()  # the chat's (tracing.http_span); events() runs after the handler returned
    call, messages, first, version = await _open_stream(gw, greq, generator_error, base["conversation_id"])
    head = {
        **base,
        "object": "chat.completion.chunk",
        "system_fingerprint": f"policy-v{version}",
        "policy_version": version,
    }
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": logprobs,
            "response_id": response_ids[index],
            "policy_version": version,
        }
        return _sse({**head, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        texts = [""] * req.n
        usage = generation_pb2.Usage()
        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            msg = first
            while msg is not None:
                # with logprobs, a token whose text is held back (a partial character, a
                # possible stop string) still gets its chunk: its log-prob, empty content
                with_logprobs = bool(req.logprobs and msg.token_ids)
                if msg.text_delta or msg.finish_reason or with_logprobs:
                    texts[msg.index] += msg.text_delta
                    delta = {"content": msg.text_delta} if msg.text_delta or with_logprobs else {}
                    logprobs = _choice_logprobs(req, msg.logprobs, msg.tokens)
                    yield chunk(msg.index, delta, msg.finish_reason or None, logprobs)
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
        _trace_usage(span, usage, version)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage.prompt_tokens, usage.completion_tokens)})
        yield b"data: [DONE]\n\n"

    return _event_stream(events(), _headers(base["conversation_id"], version))


@router.get("/v1/models")
async def models(request: Request) -> dict:
    gw: Gateway = request.app.state.gw
    await gw.refresh_info()
    return {
        "object": "list",
        "data": [
            {
                "id": gw.model_name,
                "object": "model",
                "created": gw.started,
                "owned_by": "rlhf",
                "policy_version": gw.policy_version,
            }
        ],
    }


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    gw: Gateway = request.app.state.gw
    await gw.refresh_info()
    if model_id != gw.model_name:
        raise ApiError(
            404,
            f"model: {model_id!r} is not served here; the gateway serves {gw.model_name!r}",
            "model",
            code="model_not_found",
        )
    return {
        "id": gw.model_name,
        "object": "model",
        "created": gw.started,
        "owned_by": "rlhf",
        "policy_version": gw.policy_version,
    }


# --- /v1/completions: OpenAI's legacy text completion ---------------------------------------


def _legacy_logprobs(k: int, logprobs, tokens) -> dict:
    """The legacy API's logprobs: parallel lists, the alternatives as {token: logprob}."""
    texts = [_token_text(t.token) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": list(logprobs),
        "top_logprobs": [{_token_text(c.token): c.logprob for c in t.top} for t in tokens] if k else None,
        "text_offset": offsets,
    }


@router.post("/v1/completions")
@tracing.http_span("completions")
async def text_completions(req: CompletionRequest, request: Request):
    """The prompt string continued by the policy, with no chat template. Not stored, so no
    response ids: feedback names chat answers."""
    gw: Gateway = request.app.state.gw
    if len(req.prompt) > gw.settings.max_chars:
        raise ApiError(
            413,
            f"prompt: {len(req.prompt)} characters; the limit is max_chars={gw.settings.max_chars}",
            "prompt",
        )
    max_tokens = _check_n_and_tokens(req.n, None, req.max_tokens, gw)
    span = trace.get_current_span()
    completion_id = tracing.request_id("cmpl", span)  # leads to the trace, as a chat's id does
    span.set_attributes(
        {
            "gen_ai.operation.name": "text_completion",
            "gen_ai.request.choice.count": req.n,
            "gen_ai.response.id": completion_id,
        }
    )
    params = _sampling_params(req, max_tokens, req.n)
    k = req.logprobs or 0
    params.logprobs = req.logprobs is not None
    params.top_logprobs = k
    greq = generation_pb2.GenerateRequest(request_id=completion_id, text=req.prompt, params=params)
    # not stored, but split as a chat is: by the caller's X-Conversation-Id, else as a conversation of its own
    conversation_id = request.headers.get("x-conversation-id") or f"conv-{uuid.uuid4().hex}"
    greq.policy_version = await gw.version_for(conversation_id)
    base = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": gw.model_name}

    def logprobs_of(x) -> dict | None:
        return _legacy_logprobs(k, x.logprobs, x.tokens) if req.logprobs is not None else None

    if not req.stream:
        try:
            resp = await _generate(gw, greq, conversation_id)
        except grpc.RpcError as e:
            raise _completion_error(e) from None
        _served(gw, conversation_id, resp.policy_version)
        _trace_usage(span, resp.usage, resp.policy_version)
        choices = [
            {"index": x.index, "text": x.text, "logprobs": logprobs_of(x), "finish_reason": x.finish_reason or "stop"}
            for x in sorted(resp.samples, key=lambda x: x.index)
        ]
        body = {
            **base,
            "system_fingerprint": f"policy-v{resp.policy_version}",
            "policy_version": resp.policy_version,
            "choices": choices,
            "usage": _usage(resp.usage.prompt_tokens, resp.usage.completion_tokens),
        }
        return JSONResponse(body, headers={"x-policy-version": str(resp.policy_version)})

    call, messages, first, version = await _open_stream(gw, greq, _completion_error, conversation_id)
    head = {**base, "system_fingerprint": f"policy-v{version}", "policy_version": version}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[bytes]:
        usage = generation_pb2.Usage()
        try:
            msg = first
            while msg is not None:
                if msg.text_delta or msg.finish_reason or (req.logprobs is not None and msg.token_ids):
                    choice = {
                        "index": msg.index,
                        "text": msg.text_delta,
                        "logprobs": logprobs_of(msg),
                        "finish_reason": msg.finish_reason or None,
                    }
                    yield _sse({**head, "choices": [choice]})
                if msg.HasField("usage"):
                    usage = msg.usage
                msg = await anext(messages, None)
        except grpc.RpcError as e:
            err = _completion_error(e)
            yield _sse(error_body(err.status_code, str(err.detail), err.param))
            return
        finally:
            call.cancel()
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage.prompt_tokens, usage.completion_tokens)})
        yield b"data: [DONE]\n\n"

    return _event_stream(events(), {"x-policy-version": str(version)})


def _completion_error(e: grpc.RpcError) -> ApiError:
    err = generator_error(e)
    if err.status_code == 400:
        err.param = _completion_field(e.details() or "")
    return err
