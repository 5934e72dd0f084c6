"""Fuzz the real gateway's HTTP API with hypothesis: generated bodies for
/v1/chat/completions (streaming and not) and /v1/feedback (every kind), valid ones and
ones broken on purpose in every field — integers past int64/uint32, NaN/Infinity, lone
UTF-16 surrogates, wrong types, deep nesting, huge arrays, unknown fields, bodies that are
not UTF-8 or not JSON at all.

What must hold for every example:
  * never a 5xx, in the status line or in-band in a stream;
  * every 4xx is the gateway's error envelope, {"error": {"message", "type", "param",
    "code"}} (`code` a string, as OpenAI's), with `param` naming a field of the request
    (or `body`); an unknown field is refused, never ignored;
  * a body built only from valid values is accepted (200 / 202), and everything accepted
    reaches Kafka: each served response id in an Interaction, each feedback event id on
    rlhf.feedback.

The gateway runs from its entrypoint in front of the real generator (tiny model), with
small limits so valid examples generate at most 8 tokens. RLHF_FUZZ_EXAMPLES (default
200 per endpoint) sets the bound; the run prints how many examples ran and how long.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import run_service

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("RLHF_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
ID_PATTERN = r"[A-Za-z0-9_.:-]{1,40}"  # a subset of the gateway's ID_PATTERN
LIMITS = {
    "RLHF_MAX_BODY_BYTES": "100000",
    "RLHF_MAX_MESSAGES": "8",
    "RLHF_MAX_CHARS": "2000",
    "RLHF_MAX_TOKENS_LIMIT": "8",
    "RLHF_DEFAULT_MAX_COMPLETION_TOKENS": "4",
    "RLHF_MAX_FEEDBACK_CHARS": "500",
}

CHAT_FIELDS = (
    "model",
    "messages",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "conversation_id",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "response_format",
    "user",
)
FEEDBACK_FIELDS = (
    "kind",
    "response_id",
    "value",
    "chosen_id",
    "rejected_id",
    "comment",
    "corrected_answer",
    "source",
    "event_id",
)


# --- JSON with values json.dumps cannot write: nesting past its recursion, raw literals -----


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written verbatim (json.dumps would recurse, or round the number)."""

    text: str

    def __repr__(self) -> str:  # a failing example stays readable
        return f"Raw({self.text!r})" if len(self.text) <= 60 else f"Raw({self.text[:24]!r} + … {len(self.text)} chars)"


def dumps(v: object) -> str:
    """JSON as Python's parser reads it: NaN/Infinity literals, lone surrogates as \\udxxx."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


# --- values ------------------------------------------------------------------------------

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
text_ok = st.text(max_size=40)  # any Unicode but lone surrogates: NUL, RTL, emoji, combining marks
text_hostile = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(SURROGATES)), min_size=1, max_size=5).map(
    "".join
)
any_text = st.one_of(text_ok, text_hostile)

RAW_HOSTILE = [
    nested(63),
    nested(64),
    nested(65),
    nested(1000),
    nested(30000),
    Raw("9" * 4301),
    Raw("-" + "1" * 5000),
    Raw("1" * 4000),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1E400"),
    Raw("-0"),
    Raw("0." + "0" * 400 + "1"),
    Raw("[" + ",".join(["0"] * 20000) + "]"),
    Raw("[" + ",".join(['"x"'] * 10000) + "]"),
    Raw('"\\ud800\\udc00"'),
    Raw('"\\udc00\\ud800"'),
    Raw('"' + "x" * 90000 + '"'),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from([0, -1, 2**31, 2**32, 2**32 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**40]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=10
)
hostile = st.one_of(json_values, st.sampled_from(RAW_HOSTILE))


def _mutate(valid: st.SearchStrategy, names: tuple[str, ...]) -> st.SearchStrategy:
    """(body, mutated): a valid body, or one with some fields replaced by hostile values
    and unknown fields added."""
    swaps = st.dictionaries(
        st.one_of(st.sampled_from(names), st.sampled_from(names), any_text), hostile, min_size=1, max_size=3
    )
    # two in three bodies broken: the valid third is what costs generator time
    return st.tuples(valid, st.one_of(st.just({}), swaps, swaps)).map(lambda t: ({**t[0], **t[1]}, bool(t[1])))


# --- chat bodies ----------------------------------------------------------------------------

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text_ok})
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(text_ok, st.none(), st.lists(text_part, max_size=3)),
    }
)
optional = {
    "model": text_ok,
    "n": st.integers(1, 4),
    "temperature": st.one_of(st.none(), st.floats(0, 2)),
    "top_p": st.one_of(st.none(), st.floats(0.01, 1)),  # below ~1e-45 float32 reads 0, which the generator refuses
    "max_tokens": st.one_of(st.none(), st.integers(1, 8)),
    "max_completion_tokens": st.one_of(st.none(), st.integers(1, 8)),
    "stop": st.one_of(
        st.none(), st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)
    ),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1])),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "conversation_id": st.one_of(st.none(), st.from_regex(ID_PATTERN, fullmatch=True)),
    # OpenAI fields the gateway honours, or accepts at the value that has no effect
    "user": text_ok,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
    "logprobs": st.booleans(),
    "response_format": st.just({"type": "text"}),
    "tool_choice": st.just("none"),
}
valid_chat = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=4)}, optional=optional)
chat_cases = _mutate(valid_chat, CHAT_FIELDS)

RAW_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"a string"',
    b"1",
    b"{",
    b'{"messages": [',
    b"\xff\xfe{}",
    b"\x00" * 8,
    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # UTF-8-encoded surrogate
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1, not UTF-8
    b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "BOM"}], "max_tokens": 1}',
    '{"messages": [{"role": "user", "content": "UTF-16"}], "max_tokens": 1}'.encode("utf-16"),
    b'{"messages": "' + b"x" * 200_000 + b'"}',  # over max_body_bytes
    b'{"messages": [{"role": "user", "content": "hi"}], "messages": 5}',  # duplicate key: the last wins
]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/vnd.api+json", "text/plain", None]


@dataclass
class Case:
    body: bytes
    content_type: str | None = "application/json"
    valid: bool = False  # built from valid values only: must be accepted
    keys: tuple[str, ...] = ()  # the body's own top-level names (an unknown one may be the param)
    stream: bool = False


def _case(body_and_mutated: tuple[dict, bool]) -> Case:
    body, mutated = body_and_mutated
    keys = tuple(
        json.loads(json.dumps(str(k))) for k in body
    )  # as the gateway reads them: "\\ud800\\udc00" is one character
    return Case(dumps(body).encode(), valid=not mutated, keys=keys, stream=body.get("stream") is True)


def cases(bodies: st.SearchStrategy) -> st.SearchStrategy:
    raw = st.tuples(st.sampled_from(RAW_BODIES), st.sampled_from(CONTENT_TYPES)).map(lambda t: Case(t[0], t[1]))
    typed = st.tuples(bodies.map(_case), st.sampled_from(CONTENT_TYPES))
    odd_type = typed.map(
        lambda t: Case(
            t[0].body, t[1], t[0].valid and t[1] != "text/plain" and t[1] is not None, t[0].keys, t[0].stream
        )
    )
    return st.one_of(bodies.map(_case), bodies.map(_case), odd_type, raw)  # (a raw body in four)


# --- what every answer must look like --------------------------------------------------------


@dataclass
class Tally:
    codes: dict[int, int] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)  # served response ids / feedback event ids
    started: float = field(default_factory=time.perf_counter)

    def add(self, status: int) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1

    def report(self, what: str) -> str:
        return (
            f"{what}: {sum(self.codes.values())} examples in {time.perf_counter() - self.started:.1f} s, "
            f"status codes {dict(sorted(self.codes.items()))}"
        )


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode()


def check_error(r: httpx.Response, known: tuple[str, ...], case: Case) -> None:
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["code"], str) and err["code"], err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    param = err["param"]
    assert isinstance(param, str) and param, f"{r.status_code} names no field: {err}"
    root = re.split(r"[.\[]", param)[0]
    own = any(param == _printable(k)[: len(param)] for k in case.keys)  # an unknown field the client sent
    assert root in {*known, "body"} or own, f"param {param!r} is not a field of the request: {err}"


def check_sse(r: httpx.Response) -> list[str]:
    """The stream's response ids; asserts every event is JSON, none an error, and [DONE] last."""
    events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    ids = set()
    for e in events[:-1]:
        chunk = json.loads(e)
        assert "error" not in chunk, chunk
        ids.update(c["response_id"] for c in chunk["choices"])
    return sorted(ids)


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-fuzz")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, generator, broker, module_topics):
    env = gateway_env(generator, broker.bootstrap, module_topics.prefix, **LIMITS)
    with run_service("gateway", tmp_path_factory.mktemp("gateway-fuzz"), env=env) as svc:
        yield svc


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        yield c


def post(http: httpx.Client, path: str, case: Case) -> httpx.Request:
    headers = {"content-type": case.content_type} if case.content_type else {}
    return http.build_request("POST", path, content=case.body, headers=headers)


def test_chat_completions_fuzz(http, broker, module_topics, gateway):
    tally = Tally()

    @FUZZ
    @given(cases(chat_cases))
    def one(case: Case) -> None:
        r = http.send(post(http, "/v1/chat/completions", case), stream=True)
        try:
            tally.add(r.status_code)
            assert r.status_code < 500, (r.status_code, r.read())
            if r.status_code >= 400:
                r.read()
                assert not case.valid, f"a valid body was refused: {r.text}"
                check_error(r, CHAT_FIELDS, case)
            elif r.headers["content-type"].startswith("text/event-stream"):
                tally.accepted += check_sse(r)
            else:
                body = json.loads(r.read())
                assert body["object"] == "chat.completion" and body["choices"], body
                tally.accepted += [c["response_id"] for c in body["choices"]]
        finally:
            r.close()

    one()
    print(tally.report("/v1/chat/completions"))
    assert tally.accepted, "no example was accepted: the valid half of the strategy is broken"
    assert http.get("/readyz").status_code == 200, gateway.log()
    # everything served was stored and queued: each response id reaches rlhf.interactions
    wanted = set(tally.accepted)
    seen = consume(
        broker.bootstrap,
        module_topics.interactions,
        events_pb2.Interaction,
        lambda evs: wanted <= {rid for e in evs for rid in e.response_ids},
        group="fuzz-chat",
    )
    assert wanted <= {rid for e in seen for rid in e.response_ids}


@pytest.fixture(scope="module")
def served(http) -> dict[str, list[str]]:
    """Real response ids to rate: two answers to one prompt, and one to another prompt."""

    def complete(text: str, n: int) -> list[str]:
        r = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "n": n, "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        return [c["response_id"] for c in r.json()["choices"]]

    return {"pair": complete("Say hello.", 2), "other": complete("Say goodbye.", 1)}


def feedback_cases(served: dict[str, list[str]]) -> st.SearchStrategy:
    a, b = served["pair"]
    common = {
        "comment": text_ok,
        "corrected_answer": text_ok,
        "source": st.sampled_from(["web", "api", "simulated"]),
        "event_id": st.from_regex(r"[A-Za-z0-9-]{8,64}", fullmatch=True),
    }
    rating = st.fixed_dictionaries(
        {
            "kind": st.just("rating"),
            "response_id": st.sampled_from([a, b, *served["other"]]),
            "value": st.sampled_from([1, -1]),
        },
        optional=common,
    )
    comparison = st.fixed_dictionaries(
        {"kind": st.just("comparison"), "chosen_id": st.just(a), "rejected_id": st.just(b)}, optional=common
    )
    swapped = comparison.map(lambda d: {**d, "chosen_id": b, "rejected_id": a})
    return _mutate(st.one_of(rating, comparison, swapped), FEEDBACK_FIELDS)


def test_feedback_fuzz(http, served, broker, module_topics, gateway):
    tally = Tally()

    @FUZZ
    @given(cases(feedback_cases(served)))
    def one(case: Case) -> None:
        r = http.send(post(http, "/v1/feedback", case))
        tally.add(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:
            assert not case.valid, f"a valid body was refused: {r.text}"
            check_error(r, FEEDBACK_FIELDS, case)
        else:
            assert r.status_code == 202 and r.json()["status"] == "accepted", r.text
            tally.accepted.append(r.json()["event_id"])

    one()
    print(tally.report("/v1/feedback"))
    assert tally.accepted, "no example was accepted: the valid half of the strategy is broken"
    # every accepted judgement reaches rlhf.feedback (a client-chosen event id once)
    wanted = set(tally.accepted)
    seen = consume(
        broker.bootstrap,
        module_topics.feedback,
        events_pb2.Feedback,
        lambda evs: wanted <= {e.event_id for e in evs},
        group="fuzz-feedback",
    )
    assert wanted <= {e.event_id for e in seen}
