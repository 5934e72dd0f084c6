"""The generator's serving metrics (rlhf/generation/metrics.py) after real Generate calls on
the tiny model, read from the service's own /metrics page: finish reasons equal to what the
responses said (and one cancelled stream), queue time per priority class, time to first
token per request, time per output token per finished sample of more than one token, and
no request left waiting or running."""

from __future__ import annotations

import urllib.request
from collections import Counter

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rlhf.priorities import BACKGROUND
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.procs import run_service, wait_for

QUESTION = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="Name three colours.")])


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("generator-metrics")
    env = {"RLHF_MODEL": str(tiny_model_dir), "RLHF_BACKEND": "transformers", "RLHF_FOLLOW_POLICY_UPDATES": "false"}
    with run_service("generator", tmp, env=env, timeout=180) as svc:
        with sync_channel(svc.address) as channel:
            yield svc, generation_pb2_grpc.GenerationServiceStub(channel)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the metrics page: (name, sorted labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def generate(stub, max_tokens: int, **params) -> generation_pb2.GenerateResponse:
    return stub.Generate(
        generation_pb2.GenerateRequest(
            messages=QUESTION, params=generation_pb2.SamplingParams(max_tokens=max_tokens, **params)
        ),
        timeout=120,
    )


def test_metrics_follow_the_requests_served(service):
    svc, stub = service
    before = scrape(svc.metrics_port)

    sampled = dict(n=3, temperature=1.0, seed=11)
    responses = [generate(stub, 12, temperature=0.0), generate(stub, 12, **sampled)]
    # the same seeded samples again, one stopped by its own last characters: finish_reason "stop"
    texts = [s.text.rstrip() for s in responses[1].samples]
    index = next((i for i, t in enumerate(texts) if len(t) >= 2), None)
    assert index is not None, f"no sampled answer has text to stop on: {texts}"
    responses.append(generate(stub, 12, **sampled, stop=[texts[index][-2:]]))
    assert responses[-1].samples[index].finish_reason == "stop"
    rollout = generate(stub, 5, temperature=1.0, seed=3, priority=BACKGROUND)

    # a stream the caller abandons after its first token: its sample counts as cancelled
    call = stub.GenerateStream(
        generation_pb2.GenerateRequest(
            messages=QUESTION, params=generation_pb2.SamplingParams(max_tokens=500, ignore_eos=True)
        ),
        timeout=120,
    )
    first = next(call)
    assert first.token_ids
    call.cancel()
    with pytest.raises(grpc.RpcError):
        next(call)

    finished = Counter(s.finish_reason for r in [*responses, rollout] for s in r.samples)
    multi_token = sum(len(s.token_ids) > 1 for r in [*responses, rollout] for s in r.samples)
    chat_requests = len(responses) + 1  # the abandoned stream was a chat request too

    def settled() -> dict | None:
        page = scrape(svc.metrics_port)
        idle = all(
            value(page, f"rlhf_generator_requests_{state}", priority=cls) == 0
            for state in ("waiting", "running")
            for cls in ("chat", "rollout")
        )
        cancelled = value(page, "rlhf_generator_finished_total", finish_reason="cancelled") - value(
            before, "rlhf_generator_finished_total", finish_reason="cancelled"
        )
        return page if idle and cancelled >= 1 else None

    after = wait_for(settled, 30, "no request waiting or running, the abandoned stream counted")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for reason in ("stop", "length", "error"):
        assert delta("rlhf_generator_finished_total", finish_reason=reason) == finished[reason], reason
    assert delta("rlhf_generator_finished_total", finish_reason="cancelled") == 1
    assert delta("rlhf_generator_queue_time_seconds_count", priority="chat") == chat_requests
    assert delta("rlhf_generator_queue_time_seconds_count", priority="rollout") == 1
    assert delta("rlhf_generator_queue_time_seconds_sum", priority="chat") >= 0
    assert delta("rlhf_generation_time_to_first_token_seconds_count") == chat_requests + 1
    assert delta("rlhf_generator_time_per_output_token_seconds_count") == multi_token
    tpot_sum = delta("rlhf_generator_time_per_output_token_seconds_sum")
    assert 0 < tpot_sum < multi_token * 10  # plausible: seconds per token of a tiny model, not a total


def test_every_finish_reason_and_priority_class_is_on_the_page_from_the_start(service):
    svc, _ = service
    page = scrape(svc.metrics_port)
    for reason in ("stop", "length", "cancelled", "error"):
        assert ("rlhf_generator_finished_total", (("finish_reason", reason),)) in page
    for cls in ("chat", "rollout"):
        for name in ("rlhf_generator_requests_waiting", "rlhf_generator_requests_running"):
            assert (name, (("priority", cls),)) in page
