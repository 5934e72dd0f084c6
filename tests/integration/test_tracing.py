"""One trace per chat, across real processes: the gateway and the generator (tiny model,
transformers backend) from their entrypoints with RLHF_TRACING=console, each writing its
spans to its own file. A chat's `chat.completions` span (gateway) and `generate` span
(generator) share one trace id, the generator's span is the gateway's child, and the
feedback on that chat links to it and, on Kafka, names a response id made of its trace id."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rlhf.tracing import trace_id_of
from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow


def spans(path: Path) -> list[dict]:
    """The spans a console exporter wrote (one JSON object per line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hex_id(value: str) -> str:
    return value.removeprefix("0x")


def one(found: list[dict], what: str) -> dict:
    assert len(found) == 1, f"{what}: {len(found)} spans: {found}"
    return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, broker):
    tmp = tmp_path_factory.mktemp("tracing")
    gen_env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "transformers",
        "RLHF_FOLLOW_POLICY_UPDATES": "false",
        "RLHF_TRACING": "console",
        "RLHF_TRACING_FILE": str(tmp / "generator-spans.jsonl"),
    }
    with run_service("generator", tmp, env=gen_env, timeout=180) as generator:
        topics = fresh_topics(broker.bootstrap, "tracing")
        env = gateway_env(
            generator,
            broker.bootstrap,
            topics.prefix,
            RLHF_TRACING="console",
            RLHF_TRACING_FILE=str(tmp / "gateway-spans.jsonl"),
        )
        with run_service("gateway", tmp, env=env) as gateway:
            yield tmp, gateway, topics


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_one_chat_is_one_trace_from_gateway_to_generator_to_feedback(stack, broker, stream):
    tmp, gateway, topics = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": f"trace me ({stream})"}], "max_tokens": 6}
        if stream:
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            completion_id = chunks[0]["id"]
            response_id = chunks[0]["choices"][0]["response_id"]
            finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"])
        else:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            completion_id, choice = r.json()["id"], r.json()["choices"][0]
            response_id, finish = choice["response_id"], choice["finish_reason"]
            usage = r.json()["usage"]
        rated = http.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": 1})
        assert rated.status_code == 202, rated.text
        event_id = rated.json()["event_id"]

    def gateway_spans(name: str, match) -> list[dict]:
        return [s for s in spans(tmp / "gateway-spans.jsonl") if s["name"] == name and match(s)]

    # the chat's span ends after its response went out (a stream: after its last byte)
    chat = one(
        wait_for(
            lambda: gateway_spans(
                "chat.completions", lambda s: s["attributes"].get("gen_ai.response.id") == completion_id
            ),
            30,
            "the chat's span in the gateway's file",
            detail=gateway.log,
        ),
        "chat.completions",
    )
    trace_id, chat_span_id = hex_id(chat["context"]["trace_id"]), hex_id(chat["context"]["span_id"])
    assert chat["kind"] == "SpanKind.SERVER" and chat["parent_id"] is None
    assert chat["resource"]["attributes"]["service.name"] == "rlhf-gateway"
    attrs = chat["attributes"]
    assert attrs["rlhf.response_ids"] == [response_id] and attrs["gen_ai.request.choice.count"] == 1
    assert attrs["gen_ai.conversation.id"].startswith("conv-") and attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.usage.output_tokens"] > 0 and attrs["rlhf.stream"] is stream
    if not stream:
        assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    # the one request id: the completion id (and so every response id) is made of the trace id
    assert completion_id == f"chatcmpl-{trace_id}-{chat_span_id}" and trace_id_of(response_id) == trace_id

    # the generator's span: same trace, child of the gateway's span
    generated = [s for s in spans(tmp / "generator-spans.jsonl") if hex_id(s["context"]["trace_id"]) == trace_id]
    gen = one(generated, "generator spans in the chat's trace")
    assert gen["name"] == "generate" and gen["kind"] == "SpanKind.SERVER"
    assert hex_id(gen["parent_id"]) == chat_span_id
    assert gen["resource"]["attributes"]["service.name"] == "rlhf-generator"
    g = gen["attributes"]
    assert g["rlhf.request_id"] == completion_id
    assert g["gen_ai.usage.output_tokens"] == attrs["gen_ai.usage.output_tokens"]
    assert g["gen_ai.usage.input_tokens"] == attrs["gen_ai.usage.input_tokens"]
    assert g["gen_ai.response.finish_reasons"] == [finish] and g["rlhf.policy_version"] == 0
    assert g.get("rlhf.stream", False) is stream

    # the feedback: its own trace, linked to the chat it rates
    fb = one(
        wait_for(
            lambda: gateway_spans("feedback", lambda s: s["attributes"].get("rlhf.event_id") == event_id),
            30,
            "the feedback's span",
        ),
        "feedback",
    )
    assert hex_id(fb["context"]["trace_id"]) != trace_id
    assert [(hex_id(link["context"]["trace_id"]), hex_id(link["context"]["span_id"])) for link in fb["links"]] == [
        (trace_id, chat_span_id)
    ]
    assert fb["attributes"]["http.response.status_code"] == 202

    # the Feedback event on Kafka names the rated response, whose id leads to the chat's trace
    events = consume(
        broker.bootstrap,
        topics.feedback,
        events_pb2.Feedback,
        lambda evs: any(e.event_id == event_id for e in evs),
        group=f"tracing-{stream}",
    )
    event = next(e for e in events if e.event_id == event_id)
    assert trace_id_of(event.rating.response_id) == trace_id


def test_a_refused_chat_is_a_span_with_its_status_and_no_generator_span(stack):
    tmp, gateway, _ = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 999})
        assert r.status_code in (400, 422), r.text
    refused = wait_for(
        lambda: [
            s
            for s in spans(tmp / "gateway-spans.jsonl")
            if s["name"] == "chat.completions" and s["attributes"].get("gen_ai.request.choice.count") == 999
        ],
        30,
        "the refused chat's span",
    )
    span = one(refused, "refused chat")
    assert span["attributes"]["http.response.status_code"] == r.status_code
    assert span["status"]["status_code"] == "UNSET"  # a caller's mistake is no server error
    trace_id = hex_id(span["context"]["trace_id"])
    assert not [s for s in spans(tmp / "generator-spans.jsonl") if hex_id(s["context"]["trace_id"]) == trace_id]


def test_a_text_completion_is_traced_the_same_way(stack):
    tmp, gateway, _ = stack
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 200, r.text
    completion_id = r.json()["id"]
    span = one(
        wait_for(
            lambda: [
                s
                for s in spans(tmp / "gateway-spans.jsonl")
                if s["name"] == "completions" and s["attributes"].get("gen_ai.response.id") == completion_id
            ],
            30,
            "the text completion's span",
        ),
        "completions",
    )
    trace_id, span_id = hex_id(span["context"]["trace_id"]), hex_id(span["context"]["span_id"])
    assert completion_id == f"cmpl-{trace_id}-{span_id}"
    assert span["attributes"]["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    (gen,) = [s for s in spans(tmp / "generator-spans.jsonl") if hex_id(s["context"]["trace_id"]) == trace_id]
    assert gen["name"] == "generate" and hex_id(gen["parent_id"]) == span_id
