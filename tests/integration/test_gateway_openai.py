"""The OpenAI API never silently ignores: each field OpenAI defines either works (asserted
here against the real gateway, the real generator with the transformers backend and a tiny
model) or is refused with a 400 in OpenAI's error shape naming it.

The official `openai` client drives logprobs / top_logprobs, response_format, the legacy
/v1/completions and /v1/models/{id}. response_format json_object / json_schema are asserted
both ways: refused by the transformers backend (naming `response_format`), and constrained
by a real vLLM (CPU) generator behind a second gateway (marked `vllm`).
"""

from __future__ import annotations

import json
import math

import grpc
import httpx
import openai
import pytest

from rlhf.models import load_tokenizer
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.gateway_stack import fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import run_service

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, generator, broker):
    topics = fresh_topics(broker.bootstrap, "gateway-openai")
    env = gateway_env(generator, broker.bootstrap, topics.prefix)
    with run_service("gateway", tmp_path_factory.mktemp("gateway-openai"), env=env) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_and_top_logprobs_with_the_openai_client(client, tokenizer):
    out = client.chat.completions.create(
        model="policy", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens > 0
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1 + 1e-4
        # greedy: the sampled token is the most likely one, with the same log-prob
        assert entry.top_logprobs[0].bytes == entry.bytes
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    # the tokens' bytes spell what was generated (the answer's text is their decoding, EOS aside)
    spelled = b"".join(bytes(e.bytes) for e in content)
    ids = tokenizer.encode(choice.message.content) if choice.message.content else []
    assert spelled.decode("utf-8", "replace").startswith(choice.message.content)
    assert len(ids) <= len(content)


def test_logprobs_stream_match_the_non_streamed_ones(client):
    args = dict(model="policy", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    streamed, usage = [], None
    for chunk in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed += c.logprobs.content
    assert usage is not None and len(streamed) == usage.completion_tokens == len(whole)
    assert [e.bytes for e in streamed] == [e.bytes for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_logprobs_without_top_and_none_when_not_asked(client):
    out = client.chat.completions.create(model="policy", messages=HELLO, max_tokens=3, logprobs=True)
    assert out.choices[0].logprobs.content and all(e.top_logprobs == [] for e in out.choices[0].logprobs.content)
    out = client.chat.completions.create(model="policy", messages=HELLO, max_tokens=3)
    assert out.choices[0].logprobs is None


# --- sampling fields with a real effect ------------------------------------------------------------


def test_logit_bias_and_penalties_change_what_is_sampled(http, tokenizer):
    token = tokenizer.encode(" hello")[0]
    spelled = tokenizer.convert_ids_to_tokens(token)
    body = {"messages": HELLO, "max_tokens": 10, "temperature": 0, "logprobs": True, "logit_bias": {str(token): 10}}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    biased = r.json()["choices"][0]["logprobs"]["content"]
    as_token = [bytes(e["bytes"]) for e in biased]
    assert len(as_token) == 10 and len(set(as_token)) == 1, as_token  # the biased token every step
    assert tokenizer.convert_tokens_to_ids(spelled) == token
    # the reported log-prob is the model's own, not the biased one (a random tiny model: ≈ -log V)
    assert all(e["logprob"] < -1 for e in biased)

    r = http.post(CHAT, json={**body, "frequency_penalty": 2, "presence_penalty": 2})
    assert r.status_code == 200, r.text
    penalised = [bytes(e["bytes"]) for e in r.json()["choices"][0]["logprobs"]["content"]]
    # each repeat costs 2 (frequency) + 2 once (presence): the +10 stops winning by the 5th
    assert penalised.count(as_token[0]) < 10 and penalised[0] == as_token[0], penalised


@pytest.mark.parametrize(
    "extra,param,says",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
        ({"presence_penalty": -3}, "presence_penalty", "greater than or equal to -2"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "between -100 and 100"),
        ({"logit_bias": {"hello": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"temperature": 5}, "temperature", "less than or equal to 2"),
        ({"n": 99}, "n", "max_choices="),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ],
)
def test_bad_values_are_400_naming_the_field(http, extra, param, says):
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and says in err["message"], err
    assert err["message"].startswith(param) or err["message"].startswith("generator refused"), err


# --- response_format ----------------------------------------------------------------------------


def test_response_format_as_the_transformers_backend_answers(client):
    out = client.chat.completions.create(model="policy", messages=HELLO, max_tokens=3, response_format={"type": "text"})
    assert out.choices[0].message.content is not None
    for fmt in (
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {"name": "greeting", "schema": {"type": "object", "properties": {"hi": {"type": "string"}}}},
        },
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="policy", messages=HELLO, max_tokens=3, response_format=fmt)
        assert e.value.status_code == 400 and e.value.param == "response_format", e.value.body
        assert "transformers backend has no constrained decoding" in e.value.message
        # streamed: refused before the stream starts, as a plain HTTP error
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="policy", messages=HELLO, stream=True, response_format=fmt)
        assert e.value.param == "response_format"


@pytest.fixture(scope="module")
def vllm_client(tmp_path_factory, tiny_model_dir, broker):
    """The official client against a gateway in front of a vLLM (CPU) generator."""
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "vllm",
        "RLHF_MAX_MODEL_LEN": "256",
        "RLHF_METRICS_PORT": "0",
        "RLHF_FOLLOW_POLICY_UPDATES": "false",
    }
    with run_service("generator", tmp_path_factory.mktemp("generator-vllm"), env=env, timeout=600) as gen:
        topics = fresh_topics(broker.bootstrap, "gateway-openai-vllm")
        gw_env = gateway_env(gen, broker.bootstrap, topics.prefix)
        with run_service("gateway", tmp_path_factory.mktemp("gateway-openai-vllm"), env=gw_env) as gw:
            yield openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.vllm
def test_response_format_is_constrained_decoding_on_vllm(vllm_client):
    # a root the grammar leaves no whitespace in (an object lets a random tiny model emit
    # blanks between its braces until max_tokens)
    schema = {"type": "string", "enum": ["yes", "no"]}
    for seed in (1, 2):
        out = vllm_client.chat.completions.create(
            model="policy",
            messages=HELLO,
            max_tokens=24,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        )
        text = out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop", text  # the grammar ends the object itself
        assert json.loads(text) in ("yes", "no"), text
    # and the legacy field's logprobs arrive as with the transformers backend
    out = vllm_client.chat.completions.create(
        model="policy", messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens > 0
    assert all(len(e.top_logprobs) == 2 for e in out.choices[0].logprobs.content)


# --- fields refused by name ----------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "extra,param,code",
    [
        ({"tools": [TOOL]}, "tools", "unsupported_parameter"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "unsupported_parameter"),
        ({"functions": [TOOL["function"]]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
        ({"service_tier": "flex"}, "service_tier", "unsupported_parameter"),
        ({"store": False}, "store", "unsupported_parameter"),
        ({"metadata": {"team": "a"}}, "metadata", "unsupported_parameter"),
        ({"messages": [{"role": "tool", "content": "22C", "tool_call_id": "c1"}]}, "messages[0].role", None),
        ({"messages": [{"role": "function", "content": "22C", "name": "f"}]}, "messages[0].role", None),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "messages[0].content[0].type",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, *HELLO]},
            "messages[0].tool_calls",
            "unsupported_parameter",
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name", "unsupported_parameter"),
        ({"top_k": 5}, "top_k", "unknown_parameter"),
        (
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
            "unknown_parameter",
        ),
        ({"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages[0].mood", "unknown_parameter"),
    ],
)
def test_a_field_not_honoured_is_400_naming_it(http, extra, param, code):
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["code"] == (code or "unsupported_parameter"), err
    assert err["message"].startswith(param) and ("not supported" in err["message"] or "unknown field" in err["message"])


def test_the_openai_client_sees_the_refusal(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="policy", messages=HELLO, tools=[TOOL])
    assert e.value.param == "tools" and e.value.code == "unsupported_parameter"
    assert "no tool or function calling" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="policy", messages=HELLO, extra_body={"guided_json": {}})
    assert e.value.param == "guided_json" and e.value.code == "unknown_parameter"


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [], "tool_choice": "none"},
        {"modalities": ["text"], "service_tier": "auto", "store": True, "metadata": {}},
        {"user": "someone", "safety_identifier": "h-123", "prompt_cache_key": "k"},
        {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}},
        {"response_format": {"type": "text"}, "logprobs": False},
    ],
)
def test_values_that_mean_no_effect_are_accepted(http, extra):
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


# --- /v1/completions and /v1/models/{id} ---------------------------------------------------------


def test_text_completions_with_the_openai_client(client):
    out = client.completions.create(model="policy", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    assert out.object == "text_completion" and out.usage.completion_tokens == len(out.choices[0].logprobs.tokens)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    # greedy, streamed: the same text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="policy", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == out.choices[0].text


def test_text_completions_refuse_what_they_cannot_do(http):
    for extra, param in (
        ({"echo": True}, "echo"),
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"tools": []}, "tools"),
    ):
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra})
        assert r.status_code == 400 and _error(r)["param"] == param, r.text
    r = http.post("/v1/completions", json={"max_tokens": 2})
    assert r.status_code == 400 and _error(r)["code"] == "missing_required_parameter" and _error(r)["param"] == "prompt"


def test_models_by_id(client):
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message


def test_errors_are_openai_shaped(http):
    r = http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["param"] == "body" and _error(r)["code"] == "invalid_json"
    r = http.post(CHAT, json={"model": "policy"})
    err = _error(r)
    assert r.status_code == 400 and err["param"] == "messages" and err["code"] == "missing_required_parameter"
    # the feedback endpoint is the gateway's own: same envelope, its 422 kept
    r = http.post("/v1/feedback", json={"kind": "rating", "response_id": "a1", "value": 5})
    assert r.status_code == 422 and _error(r)["param"] == "value" and isinstance(_error(r)["code"], str)
    assert json.loads(r.text)["error"]["type"] == "invalid_request_error"


# --- the generator's side, over gRPC ----------------------------------------------------------


@pytest.fixture(scope="module")
def stub(generator):
    channel = sync_channel(generator.address)
    yield generation_pb2_grpc.GenerationServiceStub(channel)
    channel.close()


def _request(**params):
    return generation_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="Hi")]),
        params=generation_pb2.SamplingParams(max_tokens=4, **params),
    )


def test_the_generator_returns_token_details_aligned_with_the_tokens(stub, tokenizer):
    resp = stub.Generate(_request(temperature=0, logprobs=True, top_logprobs=4), timeout=60)
    s = resp.samples[0]
    assert len(s.tokens) == len(s.token_ids) == len(s.logprobs) == 4
    for token_id, lp, detail in zip(s.token_ids, s.logprobs, s.tokens):
        assert detail.token, token_id
        assert [c.token_id for c in detail.top][0] == token_id and len(detail.top) == 4  # greedy: the top one
        assert detail.top[0].logprob == pytest.approx(lp, abs=1e-6)
    assert b"".join(d.token for d in s.tokens).decode("utf-8", "replace").startswith(s.text)
    # without logprobs: no details, the same tokens
    plain = stub.Generate(_request(temperature=0), timeout=60).samples[0]
    assert list(plain.token_ids) == list(s.token_ids) and len(plain.tokens) == 0


@pytest.mark.parametrize(
    "params,field",
    [
        ({"logprobs": True, "top_logprobs": 21}, "params.top_logprobs"),
        ({"top_logprobs": 2}, "params.top_logprobs"),
        ({"frequency_penalty": 2.5}, "params.frequency_penalty"),
        ({"logit_bias": {10**7: 1.0}}, "params.logit_bias"),
        ({"json_object": True}, "params.response_format"),
        ({"json_schema": '{"type": "object"}'}, "params.response_format"),
        ({"json_object": True, "json_schema": "{}"}, "params.json_schema"),
    ],
)
def test_the_generator_refuses_naming_the_param(stub, params, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_request(**params), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":")


def test_a_text_prompt_has_no_chat_template(stub, tokenizer):
    resp = stub.Generate(
        generation_pb2.GenerateRequest(text="Once upon", params=generation_pb2.SamplingParams(max_tokens=2)), timeout=60
    )
    assert list(resp.prompt_token_ids) == tokenizer.encode("Once upon")
