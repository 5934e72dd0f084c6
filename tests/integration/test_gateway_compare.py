"""Comparisons that pick their pair: the real gateway in front of the real generator
(transformers, tiny model) and the real reward service (tiny backbone), through the real
broker. With compare_candidates=4 the gateway samples 4 answers for an n=2 request and
shows the pair compare_selection picks; the test recomputes that pick from the generator's
own answers to the same seeded request (each sample's seed is seed·1000003 + index)."""

from __future__ import annotations

import itertools
import json
import re

import httpx
import pytest

from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.gateway.compare import jaccard_distance, most_diverse_pair
from tests.gateway_stack import consume, fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import free_port, run_service

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 10
SEEDS = (11, 12, 13, 14, 15, 16)


@pytest.fixture(scope="module")
def topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-compare")


@pytest.fixture(scope="module")
def reward(tmp_path_factory, broker, topics):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_REWARD_BACKBONE": "tiny",
        "RLHF_REWARD_MAX_TOKENS": "64",
        "RLHF_REWARD_TORCH_THREADS": "1",
    }
    with run_service("reward", tmp_path_factory.mktemp("reward"), env=env, timeout=180) as svc:
        yield svc


def _gateway(tmp_path_factory, generator, broker, topics, selection: str, **extra: str):
    env = gateway_env(
        generator,
        broker.bootstrap,
        topics.prefix,
        RLHF_COMPARE_CANDIDATES="4",
        RLHF_COMPARE_SELECTION=selection,
        **extra,
    )
    return run_service("gateway", tmp_path_factory.mktemp(f"gateway-{selection}"), env=env)


@pytest.fixture(scope="module")
def diverse_gw(tmp_path_factory, generator, broker, topics):
    with _gateway(tmp_path_factory, generator, broker, topics, "diverse") as svc:
        yield svc


@pytest.fixture(scope="module")
def uncertain_gw(tmp_path_factory, generator, broker, topics, reward):
    # serve_best_of=4 as well: one-answer chats are the RM's best of 4 (comparisons unaffected)
    with _gateway(
        tmp_path_factory,
        generator,
        broker,
        topics,
        "rm_uncertain",
        RLHF_REWARD_ADDR=reward.address,
        RLHF_SERVE_BEST_OF="4",
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def extremes_gw(tmp_path_factory, generator, broker, topics, reward):
    with _gateway(tmp_path_factory, generator, broker, topics, "rm_extremes", RLHF_REWARD_ADDR=reward.address) as svc:
        yield svc


@pytest.fixture(scope="module")
def no_reward_gw(tmp_path_factory, generator, broker, topics):
    # nothing listens on this port: every Score call fails UNAVAILABLE
    with _gateway(
        tmp_path_factory,
        generator,
        broker,
        topics,
        "rm_uncertain",
        RLHF_REWARD_ADDR=f"127.0.0.1:{free_port()}",
        RLHF_SCORE_TIMEOUT_SECONDS="3",
        RLHF_SERVE_BEST_OF="4",
    ) as svc:
        yield svc


def chat(gw, n: int, seed: int, stream: bool = False) -> httpx.Response:
    body = {"messages": PROMPT, "n": n, "seed": seed, "temperature": 1.0, "max_tokens": MAX_TOKENS, "stream": stream}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def texts_of(r: httpx.Response) -> list[str]:
    return [c["message"]["content"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def direct(generator, n: int, seed: int) -> list[str]:
    """The generator's own answers to the request the gateway sends for this seed."""
    stub = generation_pb2_grpc.GenerationServiceStub(sync_channel(generator.address))
    req = generation_pb2.GenerateRequest(
        request_id=f"direct-{seed}-{n}",
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in PROMPT]),
        params=generation_pb2.SamplingParams(n=n, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed),
    )
    resp = stub.Generate(req, timeout=120)
    return [s.text for s in sorted(resp.samples, key=lambda s: s.index)]


def raw_scores(reward, texts: list[str]) -> list[float]:
    stub = reward_pb2_grpc.RewardServiceStub(sync_channel(reward.address))
    chat_ = [common_pb2.ChatMessage(**m) for m in PROMPT]
    resp = stub.Score(
        reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=chat_, response=t) for t in texts]), timeout=60
    )
    return list(resp.raw_scores)


def metric(gw, name: str, labels: str = "") -> float:
    """The sum of `name`'s samples whose labels contain `labels` (all of them when empty)."""
    body = httpx.get(f"{gw.url}/metrics", timeout=10).text
    found = re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", body, re.M)
    return sum(float(v) for lab, v in found if labels in lab)


def picked(r: httpx.Response) -> tuple[int, int]:
    i, j = r.headers["x-compare-picked"].split(",")
    return int(i), int(j)


def test_diverse_shows_the_most_different_pair_of_the_four(diverse_gw, generator):
    picks = []
    for seed in SEEDS:
        r = chat(diverse_gw, 2, seed)
        candidates = direct(generator, 4, seed)
        i, j = most_diverse_pair(candidates)
        assert r.headers["x-compare-selection"] == "diverse" and r.headers["x-compare-candidates"] == "4"
        assert picked(r) == (i, j)
        assert texts_of(r) == [candidates[i], candidates[j]]
        best = max(jaccard_distance(a, b) for a, b in itertools.combinations(candidates, 2))
        assert jaccard_distance(candidates[i], candidates[j]) == best
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1] and len({c["response_id"] for c in choices}) == 2
        picks.append((i, j))
    # the selection does something: not always the first two samples
    assert any(p != (0, 1) for p in picks), (picks, [direct(generator, 4, s) for s in SEEDS])


def test_diverse_stream_carries_the_same_pair(diverse_gw):
    seed = SEEDS[0]
    want = texts_of(chat(diverse_gw, 2, seed))
    r = chat(diverse_gw, 2, seed, stream=True)
    texts, ids = ["", ""], [None, None]
    lines = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        for c in json.loads(line)["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            ids[c["index"]] = c["response_id"]
    assert texts == want
    assert r.headers["x-compare-selection"] == "diverse"
    # the streamed pair is stored: a comparison of its two ids is accepted
    fb = httpx.post(
        f"{diverse_gw.url}/v1/feedback",
        json={"kind": "comparison", "chosen_id": ids[0], "rejected_id": ids[1]},
        timeout=30,
    )
    assert fb.status_code == 202, fb.text


def test_only_the_shown_pair_is_stored_and_published(diverse_gw, broker, topics):
    r = chat(diverse_gw, 2, SEEDS[1])
    body = r.json()
    shown = [c["response_id"] for c in body["choices"]]
    # the unseen candidates have no id a client could rate
    unseen = f"{body['id']}-2"
    fb = httpx.post(
        f"{diverse_gw.url}/v1/feedback", json={"kind": "rating", "response_id": unseen, "value": 1}, timeout=30
    )
    assert fb.status_code == 404, fb.text
    ok = httpx.post(
        f"{diverse_gw.url}/v1/feedback",
        json={"kind": "comparison", "chosen_id": shown[1], "rejected_id": shown[0]},
        timeout=30,
    )
    assert ok.status_code == 202, ok.text
    events = consume(
        broker.bootstrap,
        topics.interactions,
        events_pb2.Interaction,
        lambda evs: any(e.conversation_id == body["conversation_id"] for e in evs),
        group="compare-test",
    )
    mine = [e for e in events if e.conversation_id == body["conversation_id"]]
    assert len(mine) == 1
    assert list(mine[0].response_ids) == shown and list(mine[0].responses) == texts_of(r)


def test_n1_and_n3_are_unchanged(diverse_gw, generator):
    seed = SEEDS[2]
    for n in (1, 3):
        r = chat(diverse_gw, n, seed)
        assert "x-compare-selection" not in r.headers
        assert texts_of(r) == direct(generator, n, seed)


def test_rm_uncertain_shows_the_pair_with_the_smallest_reward_gap(uncertain_gw, generator, reward):
    before = metric(uncertain_gw, "rlhf_gateway_compare_selections_total", 'selection="rm_uncertain"')
    for seed in SEEDS[:3]:
        r = chat(uncertain_gw, 2, seed)
        assert r.headers["x-compare-selection"] == "rm_uncertain"
        candidates = direct(generator, 4, seed)
        i, j = picked(r)
        assert texts_of(r) == [candidates[i], candidates[j]]
        scores = raw_scores(reward, candidates)
        gaps = {(a, b): abs(scores[a] - scores[b]) for a, b in itertools.combinations(range(4), 2)}
        # the same texts scored again (another batch) may differ in the last float bits
        assert gaps[(i, j)] <= min(gaps.values()) + 1e-5, (gaps, (i, j))
    assert metric(uncertain_gw, "rlhf_gateway_compare_selections_total", 'selection="rm_uncertain"') == before + 3


def test_rm_extremes_shows_the_rm_best_against_its_worst(extremes_gw, generator, reward):
    before = metric(extremes_gw, "rlhf_gateway_compare_selections_total", 'selection="rm_extremes"')
    for seed in SEEDS[:3]:
        r = chat(extremes_gw, 2, seed)
        assert r.headers["x-compare-selection"] == "rm_extremes"
        candidates = direct(generator, 4, seed)
        i, j = picked(r)
        assert texts_of(r) == [candidates[i], candidates[j]]
        scores = raw_scores(reward, candidates)
        shown = sorted((scores[i], scores[j]))
        # the same texts scored again (another batch) may differ in the last float bits
        assert shown[0] <= min(scores) + 1e-5 and shown[1] >= max(scores) - 1e-5, (scores, (i, j))
    assert metric(extremes_gw, "rlhf_gateway_compare_selections_total", 'selection="rm_extremes"') == before + 3


def test_reward_down_falls_back_to_the_first_two_counted(no_reward_gw, generator):
    seed = SEEDS[3]
    before = metric(no_reward_gw, "rlhf_gateway_compare_fallbacks_total")
    r = chat(no_reward_gw, 2, seed)
    assert r.headers["x-compare-selection"] == "first" and picked(r) == (0, 1)
    assert texts_of(r) == direct(generator, 4, seed)[:2]
    # the reason is the Score call's gRPC code: unavailable (refused), or deadline_exceeded on a loaded machine
    assert metric(no_reward_gw, "rlhf_gateway_compare_fallbacks_total") == before + 1
    assert "rm_uncertain comparison fell back" in no_reward_gw.log(200)


# --- serve_best_of: one-answer chats reranked by the reward model --------------------------


def test_best_of_serves_the_answer_the_rm_scores_highest(uncertain_gw, generator, reward):
    before = metric(uncertain_gw, "rlhf_gateway_best_of_selections_total", 'selection="rm_best"')
    picks = []
    for seed in SEEDS:
        r = chat(uncertain_gw, 1, seed)
        assert r.headers["x-best-of"] == "4" and r.headers["x-best-of-selection"] == "rm_best"
        candidates = direct(generator, 4, seed)
        i = int(r.headers["x-best-of-picked"])
        assert texts_of(r) == [candidates[i]]
        scores = raw_scores(reward, candidates)
        assert scores[i] >= max(scores) - 1e-5, (scores, i)
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0] and body["choices"][0]["response_id"] == f"{body['id']}-0"
        assert body["usage"]["completion_tokens"] >= len(candidates)  # the cost: all four were generated
        picks.append(i)
    assert metric(uncertain_gw, "rlhf_gateway_best_of_selections_total", 'selection="rm_best"') == before + len(SEEDS)
    # the rerank does something: not always the first sample
    assert any(i != 0 for i in picks), picks


def test_best_of_stores_only_the_served_answer(uncertain_gw):
    body = chat(uncertain_gw, 1, SEEDS[4]).json()
    ok = httpx.post(
        f"{uncertain_gw.url}/v1/feedback",
        json={"kind": "rating", "response_id": f"{body['id']}-0", "value": 1},
        timeout=30,
    )
    assert ok.status_code == 202, ok.text
    unseen = httpx.post(
        f"{uncertain_gw.url}/v1/feedback",
        json={"kind": "rating", "response_id": f"{body['id']}-1", "value": 1},
        timeout=30,
    )
    assert unseen.status_code == 404, unseen.text


def test_best_of_with_the_reward_down_serves_the_first_counted(no_reward_gw, generator):
    seed = SEEDS[5]
    before = metric(no_reward_gw, "rlhf_gateway_compare_fallbacks_total")
    r = chat(no_reward_gw, 1, seed)
    assert r.headers["x-best-of-selection"] == "first" and r.headers["x-best-of-picked"] == "0"
    assert texts_of(r) == direct(generator, 4, seed)[:1]
    assert metric(no_reward_gw, "rlhf_gateway_compare_fallbacks_total") == before + 1
    assert "best-of-n fell back to the first answer" in no_reward_gw.log(200)


def test_extreme_pair_ranks_and_breaks_ties_by_index():
    from services.gateway.compare import extreme_pair

    assert extreme_pair([0.1, 2.0, -1.0, 0.5]) == (1, 2)
    assert extreme_pair([3.0, 3.0, 1.0, 1.0]) == (0, 2)  # the earliest best, the earliest worst
    assert extreme_pair([0.2, 0.2, 0.2]) == (0, 1)  # all equal: nothing to choose
