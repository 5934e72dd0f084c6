"""Richer feedback at the gateway, through its real entrypoint in front of the real
generator: ties and both-bad with named scores, tags and metadata reach the event (and the
RM's converter) as such; a rating by the completion's top-level id or the X-Response-Id
header; a rater's second thumb on one answer supersedes the first; bounds are 422s naming
the field and the limit; GET /v1/feedback needs its key and pages."""

from __future__ import annotations

import httpx
import pytest

from rlhf.reward.data import POINT, TIE, FeedbackConverter
from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import run_service

pytestmark = pytest.mark.slow

EXPORT_KEY = "export-key-0123456789"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-rich")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, generator, broker, topics):  # noqa: F811 (fixture)
    env = gateway_env(
        generator, broker.bootstrap, topics.prefix, RLHF_RATER_HEADER="X-Rater", RLHF_FEEDBACK_EXPORT_KEYS=EXPORT_KEY
    )
    with run_service("gateway", tmp_path_factory.mktemp("rich"), env=env) as svc:
        yield svc


def chat(client: httpx.Client, n: int = 1) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "n": n})
    assert r.status_code == 200, r.text
    return r.json()


def feedback(client: httpx.Client, body: dict, rater: str | None = "alice", **headers: str) -> httpx.Response:
    if rater:
        headers["X-Rater"] = rater
    return client.post("/v1/feedback", json=body, headers=headers)


def test_richer_feedback_reaches_the_event_and_the_rm_as_such(gw, broker, topics):
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        pair = [ch["response_id"] for ch in chat(c, n=2)["choices"]]
        extras = {
            "scores": {"helpfulness": 4, "harmless": "yes"},
            "tags": ["greeting", "short"],
            "metadata": {"client": "test", "locale": "en"},
            "comment": "both fine",
        }
        tie = feedback(
            c, {"kind": "comparison", "chosen_id": pair[0], "rejected_id": pair[1], "outcome": "tie", **extras}
        )
        bad = feedback(
            c, {"kind": "comparison", "chosen_id": pair[0], "rejected_id": pair[1], "outcome": "both_bad"}, rater="bob"
        )
        assert tie.status_code == bad.status_code == 202, (tie.text, bad.text)
        ids = {tie.json()["event_id"], bad.json()["event_id"]}
    events = consume(broker.bootstrap, topics.feedback, events_pb2.Feedback, lambda es: ids <= {e.event_id for e in es})
    by_id = {e.event_id: e for e in events}
    t, b = by_id[tie.json()["event_id"]], by_id[bad.json()["event_id"]]
    assert t.comparison.outcome == events_pb2.COMPARISON_OUTCOME_TIE
    assert b.comparison.outcome == events_pb2.COMPARISON_OUTCOME_BOTH_BAD
    assert {(s.name, s.value, s.category) for s in t.scores} == {("helpfulness", 4.0, ""), ("harmless", 0.0, "yes")}
    assert list(t.tags) == ["greeting", "short"] and dict(t.metadata) == {"client": "test", "locale": "en"}
    assert t.rater_id == "header:alice" and t.comment == "both fine"
    # the reward model reads them as a tie and as two thumbs-down
    conv = FeedbackConverter()
    assert [e.kind for e in conv.convert(t)[1]] == [TIE]
    assert [(e.kind, e.label) for e in conv.convert(b)[1]] == [(POINT, -1), (POINT, -1)]


def test_rating_by_completion_id_or_header_and_a_changed_thumb_supersedes(gw, broker, topics):
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        body = chat(c)
        rid = body["choices"][0]["response_id"]
        by_id = feedback(c, {"kind": "rating", "response_id": body["id"], "value": 1})  # the top-level id
        assert by_id.status_code == 202, by_id.text and "supersedes" not in by_id.json()
        by_header = feedback(c, {"kind": "rating", "value": -1}, **{"X-Response-Id": rid})  # alice changes her thumb
        assert by_header.status_code == 202, by_header.text
        assert by_header.json()["supersedes"] == by_id.json()["event_id"]
        # someone else's thumb supersedes nothing of alice's; anonymous ones supersede nothing
        other = feedback(c, {"kind": "rating", "response_id": rid, "value": 1}, rater="carol")
        anon = [feedback(c, {"kind": "rating", "response_id": rid, "value": v}, rater=None) for v in (1, -1)]
        assert "supersedes" not in other.json() and all("supersedes" not in a.json() for a in anon)
        # a completion id with two choices is ambiguous
        two = chat(c, n=2)
        r = feedback(c, {"kind": "rating", "response_id": two["id"], "value": 1})
        assert r.status_code == 422 and "several choices" in r.json()["error"]["message"]
        missing = feedback(c, {"kind": "rating", "value": 1})
        assert missing.status_code == 422 and missing.json()["error"]["param"] == "response_id"
        # explicit supersedes must name the rater's own event
        steal = feedback(
            c,
            {"kind": "rating", "response_id": rid, "value": 1, "supersedes": by_header.json()["event_id"]},
            rater="mallory",
        )
        assert steal.status_code == 422 and steal.json()["error"]["param"] == "supersedes"
    wanted = {by_id.json()["event_id"], by_header.json()["event_id"]}
    events = consume(
        broker.bootstrap, topics.feedback, events_pb2.Feedback, lambda es: wanted <= {e.event_id for e in es}
    )
    new = next(e for e in events if e.event_id == by_header.json()["event_id"])
    assert new.supersedes_event_id == by_id.json()["event_id"] and new.rating.response_id == rid
    assert new.rating.value == -1


@pytest.mark.parametrize(
    ("extra", "param", "limit"),
    [
        ({"tags": [f"t{i}" for i in range(17)]}, "tags", "16"),
        ({"tags": ["no spaces allowed"]}, "tags[0]", "pattern"),
        ({"scores": {f"s{i}": i for i in range(17)}}, "scores", "16"),
        ({"scores": {"bad name!": 1}}, "scores", ""),
        ({"metadata": {"k": "x" * 513}}, "metadata.k", "512"),
        ({"outcome": "maybe"}, "outcome", "tie"),
    ],
)
def test_bounds_are_422_naming_the_field_and_the_limit(gw, extra, param, limit):
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        pair = [ch["response_id"] for ch in chat(c, n=2)["choices"]]
        r = feedback(c, {"kind": "comparison", "chosen_id": pair[0], "rejected_id": pair[1], **extra})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"].startswith(param) and limit in err["message"], err


def test_feedback_export_needs_its_key_filters_and_pages(gw):
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        rid = chat(c)["choices"][0]["response_id"]
        mine = [feedback(c, {"kind": "rating", "response_id": rid, "value": 1}, rater="pager").json() for _ in range(3)]
        assert c.get("/v1/feedback").status_code == 401
        assert c.get("/v1/feedback", headers={"authorization": "Bearer wrong"}).status_code == 401
        auth = {"authorization": f"Bearer {EXPORT_KEY}"}
        seen, cursor = [], 0
        while True:
            page = c.get(
                "/v1/feedback", params={"rater_id": "header:pager", "limit": 2, "cursor": cursor}, headers=auth
            )
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["data"]) <= 2
            seen += body["data"]
            if body["next_cursor"] is None:
                break
            cursor = body["next_cursor"]
        assert [e["event_id"] for e in seen] == [m["event_id"] for m in mine]
        # each later thumb superseded the one before: the export says by which
        assert [e["superseded_by"] for e in seen] == [mine[1]["event_id"], mine[2]["event_id"], ""]
        by_response = c.get("/v1/feedback", params={"response_id": rid}, headers=auth).json()["data"]
        assert {e["event_id"] for e in by_response} == {m["event_id"] for m in mine}
        conv = seen[0]["conversation_id"]
        assert all(
            e["conversation_id"] == conv
            for e in c.get("/v1/feedback", params={"conversation_id": conv}, headers=auth).json()["data"]
        )
        after = int(seen[-1]["created_unix_ms"]) + 1
        assert (
            c.get("/v1/feedback", params={"since_ms": after, "rater_id": "header:pager"}, headers=auth).json()["data"]
            == []
        )
        assert c.get("/v1/feedback", params={"limit": 5000}, headers=auth).status_code == 422
