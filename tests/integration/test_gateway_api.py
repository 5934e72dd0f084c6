"""The gateway from its real entrypoint, in front of the real generator (transformers
backend, tiny model), publishing to the real broker: the official `openai` client gets
completions streaming and not, feedback resolves served ids into events on Kafka, and
every refusal names what to fix."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import run_service

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def module_topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-api")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, generator, broker, module_topics):
    tmp = tmp_path_factory.mktemp("gateway")
    env = gateway_env(
        generator,
        broker.bootstrap,
        module_topics.prefix,
        RLHF_MAX_BODY_BYTES="20000",
        RLHF_MAX_MESSAGES="8",
        RLHF_MAX_CHARS="4000",
    )
    with run_service("gateway", tmp, env=env) as svc:
        yield svc


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        yield c


# --- the OpenAI client ------------------------------------------------------------------


def test_openai_client_non_streaming(client, gateway):
    raw = client.chat.completions.with_raw_response.create(model="policy", messages=HELLO, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    # the ids feedback needs, as extra fields the client keeps, and as headers
    extra = completion.model_extra
    assert extra["conversation_id"] and isinstance(extra["policy_version"], int)
    assert choice.model_extra["response_id"] == f"{completion.id}-0"
    assert raw.headers["x-policy-version"] == str(extra["policy_version"])
    assert raw.headers["x-conversation-id"] == extra["conversation_id"]


def test_openai_client_streaming(client, http):
    stream = client.chat.completions.create(
        model="policy", messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    response_id = chunks[0].choices[0].model_extra["response_id"]
    assert {c.model_extra["conversation_id"] for c in chunks} == {chunks[0].model_extra["conversation_id"]}
    # once the stream ended, the streamed answer can be rated
    r = http.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": -1})
    assert r.status_code == 202, r.text


def test_a_stream_the_client_abandons_is_not_stored(http):
    body = {"messages": HELLO, "max_tokens": 1000, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        first = next(r.iter_lines())
    response_id = first.split('"response_id":"')[1].split('"')[0]
    # only finished answers can be rated; the gateway keeps serving
    r = http.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": 1})
    assert r.status_code == 404
    assert http.get("/readyz").status_code == 200


def test_models_lists_the_policy(client):
    models = client.models.list().data
    assert len(models) == 1 and isinstance(models[0].model_extra["policy_version"], int)


def test_n2_compare_and_feedback_events_reach_the_broker(client, http, broker, module_topics):
    completion = client.chat.completions.create(
        model="policy", messages=HELLO, n=2, max_tokens=8, extra_body={"conversation_id": "conv-test-compare"}
    )
    assert [c.index for c in completion.choices] == [0, 1]
    a, b = (c.model_extra["response_id"] for c in completion.choices)
    assert completion.model_extra["conversation_id"] == "conv-test-compare"

    up = http.post("/v1/feedback", json={"kind": "rating", "response_id": a, "value": 1, "comment": "nice"})
    pick = http.post("/v1/feedback", json={"kind": "comparison", "chosen_id": b, "rejected_id": a, "source": "web"})
    assert up.status_code == 202 and pick.status_code == 202, (up.text, pick.text)

    wanted = {up.json()["event_id"], pick.json()["event_id"]}
    feedback = consume(
        broker.bootstrap,
        module_topics.feedback,
        events_pb2.Feedback,
        lambda evs: wanted <= {e.event_id for e in evs},
        group="t1",
    )
    mine = {f.event_id: f for f in feedback}
    rating, comparison = mine[up.json()["event_id"]], mine[pick.json()["event_id"]]
    texts = {c.model_extra["response_id"]: c.message.content for c in completion.choices}
    version = completion.model_extra["policy_version"]
    assert rating.rating.response_id == a and rating.rating.response == texts[a] and rating.rating.value == 1
    assert rating.rating.policy_version == version and rating.comment == "nice" and rating.source == "api"
    assert [(m.role, m.content) for m in rating.prompt] == [("user", "Say hello.")]
    assert (comparison.comparison.chosen_id, comparison.comparison.rejected_id) == (b, a)
    assert (comparison.comparison.chosen, comparison.comparison.rejected) == (texts[b], texts[a])
    assert comparison.source == "web" and rating.schema_version == 1

    interactions = consume(
        broker.bootstrap,
        module_topics.interactions,
        events_pb2.Interaction,
        lambda evs: any(e.conversation_id == "conv-test-compare" for e in evs),
        group="t1",
    )
    live = [i for i in interactions if i.conversation_id == "conv-test-compare"]
    assert len(live) == 1
    assert list(live[0].response_ids) == [a, b] and list(live[0].responses) == [texts[a], texts[b]]
    assert live[0].policy_version == version


def test_metrics_count_requests_tokens_feedback_and_outbox(client, http):
    list(client.chat.completions.create(model="policy", messages=HELLO, max_tokens=4, stream=True))
    body = http.get("/metrics").text
    assert 'rlhf_gateway_requests_total{code="200",route="/v1/chat/completions"}' in body
    assert 'rlhf_gateway_request_seconds_count{route="/v1/chat/completions"}' in body
    assert "rlhf_outbox_backlog " in body and "rlhf_outbox_oldest_age_seconds " in body
    streamed = [line for line in body.splitlines() if line.startswith("rlhf_gateway_tokens_streamed_total ")]
    assert float(streamed[0].split()[1]) > 0
    assert 'rlhf_feedback_events_total{kind="thumbs_down"}' in body


def test_web_page_and_readiness(http):
    page = http.get("/")
    assert page.status_code == 200 and "RLHF chat" in page.text
    assert http.get("/static/app.js").status_code == 200
    # fresh_topics created the topics, so the gateway's Kafka watch reports the broker there
    assert http.get("/readyz").json() == {"status": "SERVING", "generator": "SERVING", "kafka": "SERVING"}


# --- refusals that say what to fix --------------------------------------------------------


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_unknown_response_id_is_404(http):
    r = http.post("/v1/feedback", json={"kind": "rating", "response_id": "chatcmpl-nope-0", "value": 1})
    assert r.status_code == 404
    assert _error(r)["param"] == "response_id" and "chatcmpl-nope-0" in _error(r)["message"]
    r = http.post("/v1/feedback", json={"kind": "comparison", "chosen_id": "x1", "rejected_id": "x2"})
    assert r.status_code == 404 and _error(r)["param"] == "chosen_id"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": HELLO, "temperature": 5}, "temperature"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 9}, "n"),
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 5000}, "max_tokens"),
        ("/v1/feedback", {"kind": "rating", "response_id": "chatcmpl-x-0", "value": 5}, "value"),
        ("/v1/feedback", {"kind": "comparison", "chosen_id": "a1"}, "rejected_id"),
        ("/v1/feedback", {"kind": "thumbs", "response_id": "a1"}, "kind"),
        ("/v1/feedback", {"kind": "rating", "response_id": "a1", "value": 1, "extra": 1}, "extra"),
    ],
)
def test_malformed_is_400_or_422_naming_the_field(http, path, body, param):
    """400 on OpenAI's endpoints, as OpenAI answers a bad parameter; 422 on the gateway's own feedback."""
    r = http.post(path, json=body)
    assert r.status_code == (422 if path == "/v1/feedback" else 400), r.text
    assert _error(r)["param"] == param and _error(r)["message"].startswith(param)
    assert isinstance(_error(r)["code"], str) and _error(r)["type"] == "invalid_request_error"


def test_comparison_of_different_prompts_is_422(client, http):
    a = (
        client.chat.completions.create(model="policy", messages=HELLO, max_tokens=2)
        .choices[0]
        .model_extra["response_id"]
    )
    other = [{"role": "user", "content": "Something else."}]
    b = (
        client.chat.completions.create(model="policy", messages=other, max_tokens=2)
        .choices[0]
        .model_extra["response_id"]
    )
    r = http.post("/v1/feedback", json={"kind": "comparison", "chosen_id": a, "rejected_id": b})
    assert r.status_code == 422 and _error(r)["param"] == "rejected_id"


def test_oversized_is_413_with_the_limit(http):
    r = http.post(
        "/v1/chat/completions", content=b"{" + b" " * 30000 + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "max_body_bytes=20000" in _error(r)["message"]
    r = http.post("/v1/chat/completions", json={"messages": HELLO * 9})
    assert r.status_code == 413 and "max_messages=8" in _error(r)["message"] and _error(r)["param"] == "messages"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413 and "max_chars=4000" in _error(r)["message"]

    # a chunked upload declares no length: the gateway stops reading at the limit
    def chunks():
        yield b'{"messages": ['
        for _ in range(400):
            yield b'{"role": "user", "content": "' + b"y" * 100 + b'"},'
        yield b"]}"

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=20000" in _error(r)["message"]


def test_api_keys_and_rate_limit(tmp_path, generator, broker, module_topics):
    env = gateway_env(
        generator,
        broker.bootstrap,
        module_topics.prefix,
        RLHF_API_KEYS="k-one,k-two",
        RLHF_RATE_LIMIT_RPS="0.2",
        RLHF_RATE_LIMIT_BURST="3",
    )
    with run_service("gateway", tmp_path, env=env) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        r = http.get("/v1/models")
        assert r.status_code == 401 and _error(r)["param"] == "authorization"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert http.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/healthz").status_code == 200  # probes need no key

        key = {"authorization": "Bearer k-two"}
        codes = [http.get("/v1/models", headers=key).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = http.get("/v1/models", headers=key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "0.2 requests/s" in _error(r)["message"]
        # buckets are per key: the other key still has its burst
        assert http.get("/v1/models", headers={"x-api-key": "k-one"}).status_code == 200

        # and the official client sends the key as a bearer token
        ok = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k-one", max_retries=0)
        assert ok.chat.completions.create(model="policy", messages=HELLO, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key="bad", max_retries=0).models.list()

        # SIGTERM: drains and exits 0
        assert gw.stop() == 0, gw.log()
        assert gw.status() == "UNREACHABLE"


# --- valid JSON the gateway once answered with 500 (issue 12) ------------------------------


def _raw(http, path: str, body: dict | bytes) -> httpx.Response:
    """POST `body` as Python's json writes it: NaN/Infinity literals, lone surrogates as
    \\udxxx escapes (httpx's own encoder refuses both)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


CHAT, FEEDBACK = "/v1/chat/completions", "/v1/feedback"


@pytest.mark.parametrize(
    "path,body,param,says",
    [
        (CHAT, {"messages": HELLO, "seed": 2**63}, "seed", "9223372036854775807"),
        (CHAT, {"messages": HELLO, "seed": -(2**63) - 1}, "seed", "-9223372036854775808"),
        (CHAT, {"messages": HELLO, "seed": 2**63, "stream": True}, "seed", "9223372036854775807"),
        (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content", "lone UTF-16 surrogate"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages[0].content[0].text",
            "surrogate (\\udfff)",
        ),
        (CHAT, {"messages": HELLO, "stop": "\ud800"}, "stop", "surrogate"),
        (CHAT, {"messages": HELLO, "stop": ["ok", "\ud800"], "stream": True}, "stop[1]", "surrogate"),
        (CHAT, {"messages": HELLO, "model": "\udc00"}, "model", "surrogate"),
        (CHAT, {"messages": HELLO, "temperature": float("nan")}, "temperature", "finite number"),
        (CHAT, {"messages": HELLO, "top_p": float("inf")}, "top_p", "finite number"),
        (CHAT, {"messages": HELLO, "stop": 5}, "stop", "valid string; or Input should be a valid list"),
        (
            FEEDBACK,
            {"kind": "rating", "response_id": "chatcmpl-x-0", "value": 1, "comment": "\ud800"},
            "comment",
            "surrogate",
        ),
        (
            FEEDBACK,
            {"kind": "comparison", "chosen_id": "a1", "rejected_id": "b1", "corrected_answer": "x\udbff"},
            "corrected_answer",
            "surrogate",
        ),
        (FEEDBACK, {"kind": "\ud800"}, "kind", "does not match any of the expected tags"),
        # pydantic cannot hold a surrogate in a key: the body as a whole is refused
        (FEEDBACK, {"kind": "rating", "response_id": "a1", "value": 1, "\ud800": 1}, "body", "unicode string"),
    ],
)
def test_valid_json_the_gateway_cannot_hold_is_refused_naming_the_field(http, path, body, param, says):
    r = _raw(http, path, body)
    assert r.status_code == (422 if path == FEEDBACK else 400), r.text
    err = _error(r)
    assert err["param"] == param and err["message"].startswith(param) and says in err["message"], err


def test_json_the_parser_cannot_read_is_400_naming_the_limit(tmp_path, generator, broker, module_topics):
    unreadable = [
        (b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", "max_json_depth=64"),
        (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "max_json_depth=64"),  # past the parser's recursion
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", "limit of 4300"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 (byte 0xe9"),
    ]
    env = gateway_env(generator, broker.bootstrap, module_topics.prefix, RLHF_MAX_BODY_BYTES="200000")
    with run_service("gateway", tmp_path, env=env) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        for body, says in unreadable:
            for path in (CHAT, FEEDBACK):
                r = _raw(http, path, body)
                assert r.status_code == 400, r.text
                assert _error(r)["param"] == "body" and says in _error(r)["message"], r.text


def test_a_generator_refusal_names_the_field(http):
    r = http.post(CHAT, json={"messages": HELLO, "stop": [""]})
    assert r.status_code == 400 and _error(r)["param"] == "stop", r.text
    assert "1 to 64 characters" in _error(r)["message"]


def test_what_was_accepted_before_still_is(http, broker, module_topics):
    """The new checks refuse only what could not be held: the int64 bounds, paired
    surrogates, NUL and other odd Unicode, lax JSON types all still answer 200/202."""
    for seed in (2**63 - 1, -(2**63)):
        r = _raw(http, CHAT, {"messages": HELLO, "seed": seed, "max_tokens": 2})
        assert r.status_code == 200, r.text
    text = "😀 caf\u00e9 \u202eRTL \u0000 \U0010ffff e\u0301"
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": text}],
            "stop": ["\u00e9"],
            "max_tokens": 2,
            "stream": "true",
            "temperature": 0,
        }
    )
    assert "\\ud83d\\ude00" in body  # the emoji travels as an escaped surrogate pair
    with http.stream("POST", CHAT, content=body.encode(), headers={"content-type": "application/json"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    response_id = json.loads(lines[0][6:])["choices"][0]["response_id"]
    # what was once accepted and ignored, a field nobody defined, is now refused by name
    r = _raw(http, CHAT, {"messages": HELLO, "unknown": {"deep": [[[1e308]]]}})
    assert r.status_code == 400 and _error(r)["param"] == "unknown" and _error(r)["code"] == "unknown_parameter"
    r = _raw(
        http,
        FEEDBACK,
        {"kind": "rating", "response_id": response_id, "value": 1.0, "comment": text, "event_id": "fuzz-unicode-0001"},
    )
    assert r.status_code == 202, r.text
    feedback = consume(
        broker.bootstrap,
        module_topics.feedback,
        events_pb2.Feedback,
        lambda evs: any(e.event_id == "fuzz-unicode-0001" for e in evs),
        group="t-unicode",
    )
    event = next(e for e in feedback if e.event_id == "fuzz-unicode-0001")
    assert event.comment == text and event.prompt[0].content == text and event.rating.value == 1
