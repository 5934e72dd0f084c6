"""The gateway's canary split (services/gateway/state.py, completions.py): the real gateway
process over HTTP, the real broker, and over gRPC on loopback a stand-in generator that
serves what GetInfo says (a stable version, a candidate, the candidate's share) and answers
a request with the version it names — what a generator with a canary does (issue 15), so
the split is tested here on its own; tests/e2e/test_canary.py runs it with the real one.

Checked: every chat goes to `rlhf.canary.assign`'s pick for its conversation id (the exact
version, so the measured share is the hash's); a conversation keeps its version when the
share or the versions change, as long as that version is served; a version that stopped
being served between GetInfo and the call is answered by stable; a cross-version
comparison shows one answer of each version, and a pick between them is a Feedback event
naming the two versions; requests are counted by role."""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from concurrent import futures
from types import SimpleNamespace

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.canary import assign
from rlhf.v1 import events_pb2, generation_pb2, generation_pb2_grpc
from tests.gateway_stack import consume, fresh_topics, gateway_env
from tests.procs import free_port, run_service, wait_for


class CanaryGenerator(generation_pb2_grpc.GenerationServiceServicer):
    """Serves `stable` and `candidate` (0: none); refuses any other version as the generator does."""

    def __init__(self, stable: int, candidate: int, share: float):
        self.lock = threading.Lock()
        self.set(stable, candidate, share)
        self.asked: list[int] = []  # GenerateRequest.policy_version of every call

    def set(self, stable: int, candidate: int, share: float) -> None:
        with self.lock:
            self.stable, self.candidate, self.share = stable, candidate, share

    def GetInfo(self, request, context):
        with self.lock:
            return generation_pb2.GeneratorInfo(
                model="tiny", policy_version=self.stable, candidate_version=self.candidate, canary_share=self.share
            )

    def _version(self, request, context) -> int:
        with self.lock:
            self.asked.append(request.policy_version)
            served = (self.stable, self.candidate) if self.candidate else (self.stable,)
            if request.policy_version and request.policy_version not in served:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"policy_version: {request.policy_version} is not served (serving {served})",
                )
            return request.policy_version or self.stable

    def Generate(self, request, context):
        version = self._version(request, context)
        n = request.params.n or 1
        return generation_pb2.GenerateResponse(
            policy_version=version,
            samples=[
                generation_pb2.Sample(index=i, text=f"answer {i} of v{version}", finish_reason="stop") for i in range(n)
            ],
            usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=4 * n),
        )

    def GenerateStream(self, request, context):
        version = self._version(request, context)
        for i in range(request.params.n or 1):
            yield generation_pb2.GenerateStreamResponse(
                index=i, text_delta=f"answer {i} of v{version}", policy_version=version
            )
            yield generation_pb2.GenerateStreamResponse(index=i, finish_reason="stop", policy_version=version)


@pytest.fixture(scope="module")
def fake():
    servicer = CanaryGenerator(stable=4, candidate=5, share=0.2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield SimpleNamespace(servicer=servicer, address=f"127.0.0.1:{port}")
    server.stop(0)


@pytest.fixture(scope="module")
def topics(broker):
    return fresh_topics(broker.bootstrap, "gateway-canary")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, fake, broker, topics):
    env = gateway_env(
        fake,
        broker.bootstrap,
        topics.prefix,
        RLHF_CANARY_INFO_TTL_SECONDS="0.2",
        RLHF_CANARY_COMPARE_SHARE="1.0",
    )
    with run_service("gateway", tmp_path_factory.mktemp("gateway-canary"), env=env) as svc:
        yield svc


def chat(client: httpx.Client, conversation_id: str, n: int = 1, stream: bool = False) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}], "conversation_id": conversation_id, "n": n}
    if stream:
        body["stream"] = True
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        return {"stream": [json.loads(c[6:]) for c in chunks], "headers": r.headers}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_conversation_gets_the_splits_version_and_keeps_it(gw, fake):
    fake.servicer.set(4, 5, 0.2)
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        ids = [f"conv-split-{i}" for i in range(300)]
        got = {cid: chat(client, cid)["policy_version"] for cid in ids}
        want = {cid: assign(cid, 0.2, stable=4, candidate=5) for cid in ids}
        assert got == want
        share = sum(v == 5 for v in got.values()) / len(ids)
        assert abs(share - 0.2) <= 4 * math.sqrt(0.2 * 0.8 / len(ids))  # the hash's share, measured
        body = chat(client, ids[0])
        assert body["choices"][0]["policy_version"] == body["policy_version"] == got[ids[0]]

        # the share goes to 1: old conversations keep their version, new ones all get the candidate
        fake.servicer.set(4, 5, 1.0)
        wait_for(lambda: chat(client, f"conv-probe-{len(fake.servicer.asked)}")["policy_version"] == 5, 30, "share 1")
        on_stable = [cid for cid in ids if got[cid] == 4][:20]
        assert [chat(client, cid)["policy_version"] for cid in on_stable] == [4] * len(on_stable)
        assert {chat(client, f"conv-new-{i}")["policy_version"] for i in range(20)} == {5}

        # the candidate is promoted: its conversations keep it; stable's move (4 is no longer served)
        fake.servicer.set(5, 0, 0.0)
        wait_for(lambda: chat(client, f"conv-probe2-{len(fake.servicer.asked)}")["policy_version"] == 5, 30, "v5")
        on_candidate = [cid for cid in ids if got[cid] == 5][:10]
        assert {chat(client, cid)["policy_version"] for cid in on_candidate + on_stable} == {5}

    metrics = urllib.request.urlopen(f"{gw.url}/metrics", timeout=5).read().decode()
    assert 'rlhf_gateway_requests_by_version_total{role="candidate"}' in metrics


def test_a_version_gone_since_getinfo_is_answered_by_stable(tmp_path, fake, broker, topics):
    fake.servicer.set(4, 5, 1.0)
    env = gateway_env(fake, broker.bootstrap, topics.prefix, RLHF_CANARY_INFO_TTL_SECONDS="3600")
    with run_service("gateway", tmp_path, env=env) as svc, httpx.Client(base_url=svc.url, timeout=30) as client:
        assert chat(client, "conv-gone")["policy_version"] == 5  # GetInfo read now, kept an hour
        fake.servicer.set(4, 0, 0.0)  # the candidate was rolled back; the gateway does not know yet
        before = len(fake.servicer.asked)
        assert chat(client, "conv-gone")["policy_version"] == 4
        assert fake.servicer.asked[before:] == [5, 0]  # refused as no longer served, asked again as stable
        assert chat(client, "conv-gone", stream=True)["stream"][0]["policy_version"] == 4


def test_a_cross_version_comparison_is_a_head_to_head(gw, fake, broker, topics):
    fake.servicer.set(4, 5, 0.1)
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        probe = iter(range(10**6))
        wait_for(
            lambda: len(chat(client, f"conv-abp-{next(probe)}", n=2).get("policy_versions", [])) == 2, 30, "v5 again"
        )
        seen_orders = set()
        for i in range(12):
            body = chat(client, f"conv-ab-{i}", n=2)
            versions = [c["policy_version"] for c in body["choices"]]
            assert sorted(versions) == [4, 5] and body["policy_versions"] == versions
            assert [c["message"]["content"] for c in body["choices"]] == [f"answer 0 of v{v}" for v in versions]
            seen_orders.add(tuple(versions))
        assert seen_orders == {(4, 5), (5, 4)}  # shown in random order
        streamed = chat(client, "conv-ab-stream", n=2, stream=True)
        assert {c["choices"][0]["policy_version"] for c in streamed["stream"]} == {4, 5}

        # the person prefers the candidate's answer: the Feedback event names both versions
        chosen = next(c for c in body["choices"] if c["policy_version"] == 5)
        rejected = next(c for c in body["choices"] if c["policy_version"] == 4)
        r = client.post(
            "/v1/feedback",
            json={"kind": "comparison", "chosen_id": chosen["response_id"], "rejected_id": rejected["response_id"]},
        )
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
    got = consume(
        broker.bootstrap,
        topics.feedback,
        events_pb2.Feedback,
        lambda evs: any(e.event_id == event_id for e in evs),
        group="test-canary-feedback",
    )
    [fb] = [e for e in got if e.event_id == event_id]
    assert (fb.comparison.chosen_policy_version, fb.comparison.rejected_policy_version) == (5, 4)
