"""Trustworthy feedback at the gateway, through its real entrypoint in front of the real
generator: every Feedback event names its rater (the API key's principal, the web page's
signed cookie, a trusted proxy header, or anonymous), a forged or tampered cookie counts as
anonymous, one rater over feedback_rate_limit_rps gets 429 while another still gets 202,
and every PII type is redacted in the prompt, answer, comment and corrected answer of the
event that reaches the outbox (counted by type), unless redact_pii is off."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from rlhf.bus import Topics, decode
from rlhf.outbox import Outbox
from rlhf.v1 import events_pb2
from services.gateway.guard import RATER_COOKIE, Rater
from services.gateway.schemas import ComparisonIn
from services.gateway.store import GatewayStore
from tests.gateway_stack import fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import run_service

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello."}]
KEYS = ("alpha-key-0123456789", "beta-key-0123456789")

# one of each type, and what each must become
PII = {
    "email": ("jane.doe@example.com", "<EMAIL>"),
    "phone": ("+1 (415) 555-0100", "<PHONE>"),
    "credit_card": ("4111 1111 1111 1111", "<CREDIT_CARD>"),
    "secret": ("sk-proj-abcdefghijklmnopqrstuvwx1234", "<SECRET>"),
    "ipv4": ("192.168.10.20", "<IP_ADDRESS>"),
    "ipv6": ("2001:db8::8a2e:370:7334", "<IP_ADDRESS>"),
}
PII_TEXT = "reach me: " + " / ".join(raw for raw, _ in PII.values()) + " (order 4111 1111 1111 1112, v1.2.3.4.5)"
REDACTED_TEXT = "reach me: " + " / ".join(p for _, p in PII.values()) + " (order 4111 1111 1111 1112, v1.2.3.4.5)"
COUNTS = {"email": 1, "phone": 1, "credit_card": 1, "secret": 1, "ip_address": 2}  # PII_TEXT, once


@pytest.fixture(scope="module")
def topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-identity")


def _gateway(tmp_path_factory, generator, broker, topics, name: str, **extra: str):  # noqa: F811 (fixture)
    tmp = tmp_path_factory.mktemp(name)
    return run_service("gateway", tmp, env=gateway_env(generator, broker.bootstrap, topics.prefix, **extra))


@pytest.fixture(scope="module")
def keyed_gw(tmp_path_factory, generator, broker, topics):  # noqa: F811 (fixture)
    # 3 feedbacks per rater, then one per 300 s: the fourth within the test is a 429
    with _gateway(
        tmp_path_factory,
        generator,
        broker,
        topics,
        "keyed",
        RLHF_API_KEYS=",".join(KEYS),
        RLHF_FEEDBACK_RATE_LIMIT_RPS="0.01",
        RLHF_FEEDBACK_RATE_LIMIT_BURST="3",
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def open_gw(tmp_path_factory, generator, broker, topics):  # noqa: F811 (fixture)
    with _gateway(tmp_path_factory, generator, broker, topics, "open", RLHF_RATER_HEADER="X-Forwarded-User") as svc:
        yield svc


@pytest.fixture(scope="module")
def plain_gw(tmp_path_factory, generator, broker, topics):  # noqa: F811 (fixture)
    with _gateway(tmp_path_factory, generator, broker, topics, "plain", RLHF_REDACT_PII="false") as svc:
        yield svc


def outbox_file(gw) -> Path:
    return Path(gw.env["RLHF_STATE_DIR"]) / "gateway" / "outbox.db"


def outbox_event(gw, event_id: str, cls=events_pb2.Feedback):
    """The event as committed to the gateway's outbox (committed before the 202)."""
    with sqlite3.connect(outbox_file(gw), timeout=30) as db:
        row = db.execute("SELECT payload FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
    assert row is not None, f"event {event_id} not in the outbox"
    return decode(cls, row[0])


def chat(client: httpx.Client, messages=HELLO, **extra) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def rate(client: httpx.Client, response_id: str, **extra) -> httpx.Response:
    return client.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": 1, **extra})


def metric(gw, sample: str) -> float:
    """The value of one sample (`name` or `name{labels}` as exported), 0 if absent."""
    for line in httpx.get(f"{gw.url}/metrics", timeout=30).text.splitlines():
        if line.split(" ")[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def redactions(gw) -> dict[str, float]:
    return {k: metric(gw, f'rlhf_gateway_pii_redactions_total{{type="{k}"}}') for k in COUNTS}


# --- who gave it ----------------------------------------------------------------------------


def test_feedback_with_a_key_carries_the_keys_principal(keyed_gw):
    rater_ids = []
    for key in KEYS:
        with httpx.Client(base_url=keyed_gw.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as c:
            rid = chat(c)["choices"][0]["response_id"]
            r = rate(c, rid)
            assert r.status_code == 202, r.text
            event = outbox_event(keyed_gw, r.json()["event_id"])
            assert not event.anonymous and event.rater_id.startswith("key:")
            # the principal is a fingerprint, never the key itself
            assert key not in event.rater_id
            # the same key is the same rater, every time
            again = outbox_event(keyed_gw, rate(c, rid).json()["event_id"])
            assert again.rater_id == event.rater_id
            rater_ids.append(event.rater_id)
    assert rater_ids[0] != rater_ids[1]


def test_one_rater_over_the_feedback_limit_gets_429_another_still_202(keyed_gw):
    alpha = httpx.Client(base_url=keyed_gw.url, timeout=60, headers={"authorization": f"Bearer {KEYS[0]}"})
    beta = httpx.Client(base_url=keyed_gw.url, timeout=60, headers={"authorization": f"Bearer {KEYS[1]}"})
    with alpha, beta:
        rid = chat(alpha)["choices"][0]["response_id"]
        # burst 3 per rater (the test above may have spent 2 of alpha's): the 4th at the latest is refused
        codes = [rate(alpha, rid).status_code for _ in range(4)]
        assert codes[-1] == 429 and codes[0] == 202 and codes == sorted(codes), codes
        refused = rate(alpha, rid)
        assert refused.status_code == 429
        err = refused.json()["error"]
        assert "feedback_rate_limit_rps=0.01" in err["message"] and "feedback_rate_limit_burst=3" in err["message"]
        assert err["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
        # the limit is per rater, and only for feedback: alpha still chats, beta still rates
        # (beta has sent at most 2 of its 3 so far)
        chat(alpha)
        ok = rate(beta, chat(beta)["choices"][0]["response_id"])
        assert ok.status_code == 202, ok.text


def test_web_page_cookie_names_the_rater(open_gw):
    with httpx.Client(base_url=open_gw.url, timeout=60) as page:
        first = page.get("/")
        assert first.status_code == 200
        set_cookie = first.headers["set-cookie"]
        assert (
            set_cookie.startswith(f"{RATER_COOKIE}=") and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        )
        cookie = page.cookies[RATER_COOKIE]
        # a page load that brings a valid cookie keeps it
        assert "set-cookie" not in page.get("/").headers
        rid = chat(page)["choices"][0]["response_id"]
        r = rate(page, rid, source="web")
        assert r.status_code == 202, r.text
        event = outbox_event(open_gw, r.json()["event_id"])
        uid = cookie.split(".")[0]
        assert event.rater_id == f"web:{uid}" and not event.anonymous and event.source == "web"
        # another browser is another rater
        with httpx.Client(base_url=open_gw.url, timeout=60) as other:
            other.get("/")
            event2 = outbox_event(open_gw, rate(other, rid).json()["event_id"])
        assert event2.rater_id.startswith("web:") and event2.rater_id != event.rater_id


def _flip(s: str) -> str:
    return ("B" if s[0] == "A" else "A") + s[1:]


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: _flip(c),  # another id under the genuine signature
        lambda c: c.split(".")[0] + "." + _flip(c.split(".")[1]),  # signature tampered
        lambda c: "someone-else." + "A" * 43,  # made up
        lambda c: c.split(".")[0],  # signature dropped
    ],
    ids=["changed-id", "changed-signature", "made-up", "unsigned"],
)
def test_a_forged_cookie_is_treated_as_anonymous(open_gw, forge):
    with httpx.Client(base_url=open_gw.url, timeout=60) as page:
        page.get("/")
        genuine = page.cookies[RATER_COOKIE]
        rid = chat(page)["choices"][0]["response_id"]
    ignored_before = metric(open_gw, "rlhf_gateway_rater_cookies_ignored_total")
    with httpx.Client(base_url=open_gw.url, timeout=60, cookies={RATER_COOKIE: forge(genuine)}) as forger:
        r = rate(forger, rid)
        # kept (a person's judgement), but not credited to anyone
        assert r.status_code == 202, r.text
        event = outbox_event(open_gw, r.json()["event_id"])
        assert event.anonymous and event.rater_id == ""
        assert metric(open_gw, "rlhf_gateway_rater_cookies_ignored_total") == ignored_before + 1
        # loading the page replaces the bad cookie with a valid one
        assert forger.get("/").headers["set-cookie"].startswith(f"{RATER_COOKIE}=")


def test_trusted_proxy_header_names_the_rater_and_without_anything_it_is_anonymous(open_gw):
    with httpx.Client(base_url=open_gw.url, timeout=60) as c:
        rid = chat(c)["choices"][0]["response_id"]
        r = c.post(
            "/v1/feedback",
            json={"kind": "rating", "response_id": rid, "value": -1},
            headers={"x-forwarded-user": "alice@corp"},
        )
        assert r.status_code == 202, r.text
        assert outbox_event(open_gw, r.json()["event_id"]).rater_id == "header:alice@corp"
        too_long = c.post(
            "/v1/feedback",
            json={"kind": "rating", "response_id": rid, "value": -1},
            headers={"x-forwarded-user": "u" * 300},
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "x-forwarded-user" and "256" in too_long.json()["error"]["message"]
        anon = rate(c, rid)
        assert anon.status_code == 202
        event = outbox_event(open_gw, anon.json()["event_id"])
        assert event.anonymous and event.rater_id == ""
    body = httpx.get(f"{open_gw.url}/metrics", timeout=30).text
    for via in ("cookie", "header", "anonymous"):
        assert f'rlhf_gateway_feedback_raters_total{{identity="{via}"}}' in body
    assert "alice" not in body  # no rater id in any label


def test_the_rater_header_is_not_trusted_unless_configured(plain_gw):
    with httpx.Client(base_url=plain_gw.url, timeout=60) as c:
        rid = chat(c)["choices"][0]["response_id"]
        r = c.post(
            "/v1/feedback",
            json={"kind": "rating", "response_id": rid, "value": 1},
            headers={"x-forwarded-user": "mallory"},
        )
        event = outbox_event(plain_gw, r.json()["event_id"])
        assert event.anonymous and event.rater_id == ""


# --- PII redaction --------------------------------------------------------------------------


def _insert_unredacted_pair(gw, prompt: list[dict], texts: list[str]) -> list[str]:
    """Served answers stored as a gateway with redact_pii off (or one from before redaction)
    stored them: feedback must redact them when it copies them. The tiny random model's own
    answers never hold PII, so this is how an answer with PII gets into the store."""
    ids = [f"chatcmpl-pii{time.time_ns()}-{i}" for i in range(len(texts))]
    with sqlite3.connect(outbox_file(gw), timeout=30) as db:
        db.executemany(
            "INSERT INTO responses (id, conversation_id, prompt, text, policy_version, created, redacted) "
            "VALUES (?, ?, ?, ?, 0, ?, 0)",
            [(rid, "conv-pii-test", json.dumps(prompt), text, time.time()) for rid, text in zip(ids, texts)],
        )
    return ids


def test_each_pii_type_is_redacted_in_prompt_answer_comment_and_correction(open_gw):
    before = redactions(open_gw)
    prompt = [{"role": "user", "content": PII_TEXT}]
    with httpx.Client(base_url=open_gw.url, timeout=60) as c:
        # a real chat whose prompt holds PII: stored and published redacted
        body = chat(c, messages=prompt)
        rid = body["choices"][0]["response_id"]
        r = rate(c, rid, comment=PII_TEXT, corrected_answer=PII_TEXT)
        assert r.status_code == 202, r.text
        event = outbox_event(open_gw, r.json()["event_id"])
        assert [m.content for m in event.prompt] == [REDACTED_TEXT]
        assert event.comment == REDACTED_TEXT and event.corrected_answer == REDACTED_TEXT
        assert event.rating.response == body["choices"][0]["message"]["content"]  # no PII in it: unchanged
        with sqlite3.connect(outbox_file(open_gw), timeout=30) as db:
            (payload,) = db.execute(
                "SELECT payload FROM outbox WHERE topic LIKE '%interactions' AND key = ?",
                (body["conversation_id"].encode(),),
            ).fetchone()
        assert [m.content for m in decode(events_pb2.Interaction, payload).prompt] == [REDACTED_TEXT]

        # answers with PII, stored unredacted: a comparison's both answers come out redacted
        chosen, rejected = _insert_unredacted_pair(open_gw, prompt, [PII_TEXT, "fine: " + PII_TEXT])
        r = c.post("/v1/feedback", json={"kind": "comparison", "chosen_id": chosen, "rejected_id": rejected})
        assert r.status_code == 202, r.text
        event = outbox_event(open_gw, r.json()["event_id"])
        assert event.comparison.chosen == REDACTED_TEXT and event.comparison.rejected == "fine: " + REDACTED_TEXT
        assert [m.content for m in event.prompt] == [REDACTED_TEXT]
        # and a rating of such an answer
        (answer,) = _insert_unredacted_pair(open_gw, prompt, [PII_TEXT])
        event = outbox_event(open_gw, rate(c, answer).json()["event_id"])
        assert event.rating.response == REDACTED_TEXT

    # what the client was answered is never changed, only what is kept; every hit counted
    # (chat prompt, comment, correction; comparison prompt + 2 answers; rating prompt + answer)
    after = redactions(open_gw)
    assert {k: after[k] - before[k] for k in COUNTS} == {k: n * 8 for k, n in COUNTS.items()}


def test_redact_pii_off_leaves_text_alone(plain_gw):
    before = redactions(plain_gw)
    with httpx.Client(base_url=plain_gw.url, timeout=60) as c:
        prompt = [{"role": "user", "content": PII_TEXT}]
        rid = chat(c, messages=prompt)["choices"][0]["response_id"]
        r = rate(c, rid, comment=PII_TEXT, corrected_answer=PII_TEXT)
        event = outbox_event(plain_gw, r.json()["event_id"])
        assert [m.content for m in event.prompt] == [PII_TEXT]
        assert event.comment == PII_TEXT and event.corrected_answer == PII_TEXT
        (answer,) = _insert_unredacted_pair(plain_gw, prompt, [PII_TEXT])
        assert outbox_event(plain_gw, rate(c, answer).json()["event_id"]).rating.response == PII_TEXT
    assert redactions(plain_gw) == before


def test_store_redacts_answers_when_they_are_recorded(tmp_path):
    """The completion side, on the store itself (a real SQLite outbox): the answers and prompt
    are stored and queued redacted, so feedback copies redacted text and counts nothing twice."""
    topics = Topics("test-store-redact")

    async def scenario() -> tuple[events_pb2.Interaction, events_pb2.Feedback]:
        outbox = Outbox(tmp_path / "outbox.db")
        store = GatewayStore(outbox, topics)
        try:
            interaction = await store.record_completion(
                "conv-1", [{"role": "user", "content": PII_TEXT}], [("r-0", PII_TEXT), ("r-1", "plain")], 3
            )
            fb = ComparisonIn(kind="comparison", chosen_id="r-0", rejected_id="r-1", comment="", corrected_answer="")
            feedback = await store.add_feedback(fb, Rater("key:abc", "key"))
            return interaction, feedback
        finally:
            store.close()
            outbox.close()

    interaction, feedback = asyncio.run(scenario())
    assert list(interaction.responses) == [REDACTED_TEXT, "plain"]
    assert [m.content for m in interaction.prompt] == [REDACTED_TEXT]
    assert feedback.comparison.chosen == REDACTED_TEXT and feedback.comparison.rejected == "plain"
    assert feedback.rater_id == "key:abc" and not feedback.anonymous
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        stored = dict(db.execute("SELECT id, text FROM responses").fetchall())
    assert stored == {"r-0": REDACTED_TEXT, "r-1": "plain"}
