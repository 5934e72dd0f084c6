"""The generation service from its real entrypoint, once per backend: transformers, and the
real vLLM CPU engine (one engine start for the whole module; ≈ 1 min on 2 cores).

Log-probs are checked against `rlhf.models.sequence_logprobs` (one plain fp32 forward pass
of the same weights) to ABS_TOL: both backends decode in fp32 with a KV cache, which
reorders float sums; measured error ≈ 1e-6 on the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.bus import EventProducer, Topics, ensure_topics, new_event
from rlhf.generation.adapters import make_random_lora
from rlhf.models import build_tiny_model, load_causal_lm, sequence_logprobs
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.procs import run_service

ABS_TOL = 1e-4
MAX_MODEL_LEN = 256
CHUNK = 256 * 1024
QUESTION = [common_pb2.ChatMessage(role="user", content="Name three colours.")]

BACKENDS = ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])]


@dataclass
class Stack:
    backend: str
    address: str
    stub: generation_pb2_grpc.GenerationServiceStub
    store: WeightStore
    topics: Topics
    bootstrap: str
    models: dict[str, Path]      # "base", "other" (same shapes, different weights), "lora" (adapter folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gen-models")
    # wider init than the seed-1 fixture, so greedy output visibly differs from the base model
    other = build_tiny_model(tmp / "other", seed=1, initializer_range=0.2)
    make_random_lora(tiny_model_dir, tmp / "lora", rank=8, seed=3)
    wrong = build_tiny_model(tmp / "wrong", hidden_size=96, seed=2)
    return {"base": tiny_model_dir, "other": other, "lora": tmp / "lora", "wrong": wrong}


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, tmp_path_factory, models, broker):
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"generator-{backend}")
    topics = Topics(f"test-gen-{backend}-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, topics.all())
    store = WeightStore(tmp / "weights")
    env = {
        "RLHF_MODEL": str(models["base"]), "RLHF_BACKEND": backend, "RLHF_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "RLHF_WEIGHT_STORE": str(store.root), "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix, "RLHF_FOLLOW_POLICY_UPDATES": "true", "RLHF_MAX_BATCH": "32",
    }
    with run_service("generator", tmp, env=env, timeout=600) as svc:
        with sync_channel(svc.address) as channel:
            yield Stack(backend, svc.address, generation_pb2_grpc.GenerationServiceStub(channel), store, topics,
                        broker.bootstrap, models)


@pytest.fixture(autouse=True)
def base_weights(stack):
    """Every test starts on version 0, the weights the service started with."""
    stack.stub.LoadVersion(generation_pb2.LoadVersionRequest(version=0), timeout=60)
    yield


_cache: dict[str, torch.nn.Module] = {}


def model_for(stack: Stack, version: str) -> torch.nn.Module:
    """The reference model for a weight set: "base", "other" or "lora" (base + adapter)."""
    if version not in _cache:
        if version == "lora":
            from peft import PeftModel

            _cache[version] = PeftModel.from_pretrained(load_causal_lm(stack.models["base"]), stack.models["lora"]).eval()
        else:
            _cache[version] = load_causal_lm(stack.models[version])
    return _cache[version]


def generate(stack: Stack, max_tokens: int = 16, timeout: float = 120, **params) -> generation_pb2.GenerateResponse:
    return stack.stub.Generate(
        generation_pb2.GenerateRequest(messages=common_pb2.ChatMessages(messages=QUESTION),
                                       params=generation_pb2.SamplingParams(max_tokens=max_tokens, **params)),
        timeout=timeout,
    )


def greedy(stack: Stack) -> list[int]:
    return list(generate(stack, temperature=0.0).samples[0].token_ids)


def assert_logprobs_match(resp: generation_pb2.GenerateResponse, model: torch.nn.Module) -> float:
    worst = 0.0
    for s in resp.samples:
        assert len(s.logprobs) == len(s.token_ids) > 0
        ref = sequence_logprobs(model, list(resp.prompt_token_ids), list(s.token_ids))
        worst = max(worst, (ref - torch.tensor(list(s.logprobs))).abs().max().item())
    assert worst < ABS_TOL, f"log-probs differ from a direct forward pass by {worst:.2e}"
    return worst


def push_full(stack: Stack, version: int, model_dir: Path, sha256: str | None = None) -> generation_pb2.UpdateWeightsResponse:
    data = (model_dir / "model.safetensors").read_bytes()
    header = generation_pb2.WeightHeader(version=version, format=common_pb2.WEIGHT_FORMAT_FULL, total_bytes=len(data),
                                         sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest())

    def chunks():
        yield generation_pb2.WeightChunk(header=header)
        for i in range(0, len(data), CHUNK):
            yield generation_pb2.WeightChunk(data=data[i:i + CHUNK])

    return stack.stub.UpdateWeights(chunks(), timeout=120)


def put_lora(stack: Stack, version: int) -> None:
    folder = stack.models["lora"]
    if not stack.store.folder(version).exists():
        stack.store.put(version, load_file(str(folder / "adapter_model.safetensors")), fmt="lora",
                        adapter_config=json.loads((folder / "adapter_config.json").read_text()))


# --- generation -------------------------------------------------------------------------


def test_info_reports_backend_and_version(stack):
    info = stack.stub.GetInfo(generation_pb2.GetInfoRequest())
    assert (info.backend, info.policy_version, info.max_model_len) == (stack.backend, 0, MAX_MODEL_LEN)
    assert info.weight_format == common_pb2.WEIGHT_FORMAT_FULL


def test_logprobs_match_a_direct_forward_pass(stack):
    resp = generate(stack, n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=24)
    assert resp.policy_version == 0 and len(resp.samples) == 3
    assert resp.usage.prompt_tokens == len(resp.prompt_token_ids)
    assert resp.usage.completion_tokens == sum(len(s.token_ids) for s in resp.samples)
    assert {s.finish_reason for s in resp.samples} <= {"stop", "length"}
    assert_logprobs_match(resp, model_for(stack, "base"))


def test_token_id_prompt_and_stream_agree_with_unary(stack):
    unary = generate(stack, temperature=0.0, max_tokens=12)
    req = generation_pb2.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=list(unary.prompt_token_ids)),
        params=generation_pb2.SamplingParams(temperature=0.0, max_tokens=12),
    )
    parts = list(stack.stub.GenerateStream(req, timeout=120))
    tokens = [t for p in parts for t in p.token_ids]
    assert tokens == list(unary.samples[0].token_ids)
    assert "".join(p.text_delta for p in parts) == unary.samples[0].text
    assert parts[-1].finish_reason == unary.samples[0].finish_reason
    assert parts[-1].usage.completion_tokens == len(tokens)
    assert {p.policy_version for p in parts} == {0}


# --- weight swaps -----------------------------------------------------------------------


def test_update_weights_changes_greedy_output_and_version(stack):
    before = greedy(stack)
    resp = push_full(stack, 11, stack.models["other"])
    assert resp.version == 11
    after = generate(stack, temperature=0.0)
    assert after.policy_version == 11
    assert list(after.samples[0].token_ids) != before
    # the log-probs now come from the new weights, all of them (incl. the tied lm_head)
    assert_logprobs_match(after, model_for(stack, "other"))
    assert stack.stub.GetInfo(generation_pb2.GetInfoRequest()).policy_version == 11


def test_lora_version_from_the_weight_store(stack):
    """A LoRA version is an adapter on the initial weights (what the learner trains it
    against), even when a full version serves when it arrives."""
    put_lora(stack, 21)
    assert push_full(stack, 20, stack.models["other"]).version == 20
    before = greedy(stack)
    resp = stack.stub.LoadVersion(generation_pb2.LoadVersionRequest(version=21), timeout=120)
    assert resp.version == 21
    after = generate(stack, n=2, temperature=1.0, seed=5, max_tokens=16)
    assert after.policy_version == 21
    assert_logprobs_match(after, model_for(stack, "lora"))
    assert greedy(stack) != before
    info = stack.stub.GetInfo(generation_pb2.GetInfoRequest())
    assert (info.policy_version, info.weight_format) == (21, common_pb2.WEIGHT_FORMAT_LORA)


def test_twenty_concurrent_requests_during_a_swap_all_succeed(stack):
    """20 clients send requests back to back; once each has had one answer, a full update
    streams in and swaps while they go on; each sends one more after the swap returned. Every
    request must succeed, and each response must come whole from the version it reports
    (checked through its log-probs). Half the clients send background priority (10): a
    mixed queue changes the order of service, never what is served."""
    swapped, started = threading.Event(), threading.Barrier(21, timeout=300)

    def client(i: int) -> list[generation_pb2.GenerateResponse]:
        req = generation_pb2.GenerateRequest(
            messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=f"Count to {i}.")]),
            params=generation_pb2.SamplingParams(temperature=1.0, seed=i, max_tokens=24, priority=10 * (i % 2)),
        )
        out = [stack.stub.Generate(req, timeout=300)]
        started.wait()
        while not swapped.is_set():
            out.append(stack.stub.Generate(req, timeout=300))
        return out + [stack.stub.Generate(req, timeout=300)]

    with ThreadPoolExecutor(max_workers=21) as pool:
        clients = [pool.submit(client, i) for i in range(20)]
        try:
            started.wait()
            assert push_full(stack, 31, stack.models["other"]).version == 31
        finally:
            swapped.set()
        per_client = [c.result() for c in clients]  # raises if any request failed
    for responses in per_client:
        versions = [r.policy_version for r in responses]
        assert versions == sorted(versions) and set(versions) <= {0, 31}, versions  # never back to old weights
        assert versions[0] == 0 and versions[-1] == 31
        for r in responses:
            assert_logprobs_match(r, model_for(stack, "base" if r.policy_version == 0 else "other"))


def test_bad_sha_is_refused_and_the_old_version_keeps_serving(stack):
    before = greedy(stack)
    with pytest.raises(grpc.RpcError) as e:
        push_full(stack, 41, stack.models["other"], sha256="0" * 64)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in e.value.details() and "version 0 keeps serving" in e.value.details()
    assert stack.stub.GetInfo(generation_pb2.GetInfoRequest()).policy_version == 0
    assert greedy(stack) == before


def test_wrong_shapes_and_corrupt_store_files_are_refused(stack, tmp_path):
    with pytest.raises(grpc.RpcError) as e:
        push_full(stack, 42, stack.models["wrong"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in e.value.details()
    # a store version whose bytes changed after the manifest was written
    state = load_file(str(stack.models["other"] / "model.safetensors"))
    record = stack.store.put(43, state)
    tampered = {k: v.clone() for k, v in state.items()}
    next(iter(tampered.values())).add_(1.0)
    save_file(tampered, str(record.weights_path))
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.LoadVersion(generation_pb2.LoadVersionRequest(version=43), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stack.stub.LoadVersion(generation_pb2.LoadVersionRequest(version=999), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "999" in e.value.details()
    assert generate(stack, temperature=0.0).policy_version == 0


def test_follows_policy_updates_on_kafka(stack):
    other = stack.store.folder(51)
    if not other.exists():
        stack.store.put(51, load_file(str(stack.models["other"] / "model.safetensors")))
    put_lora(stack, 52)
    record = stack.store.get(51)
    events = [
        dict(version=51, action=events_pb2.POLICY_ACTION_PROMOTED, format=common_pb2.WEIGHT_FORMAT_FULL),
        dict(version=52, action=events_pb2.POLICY_ACTION_REJECTED, format=common_pb2.WEIGHT_FORMAT_LORA),
    ]
    with EventProducer(stack.bootstrap) as producer:
        for ev in events:
            folder = stack.store.folder(ev["version"])
            producer.publish(stack.topics.policy_updates, new_event(
                events_pb2.PolicyUpdate, uri=str(folder), sha256=stack.store.get(ev["version"]).sha256, **ev), key="policy")
        assert wait_for_version(stack, 51) == 51          # PROMOTED: loaded
        assert record.sha256                               # (the REJECTED 52 is never loaded)
        producer.publish(stack.topics.policy_updates, new_event(
            events_pb2.PolicyUpdate, version=0, action=events_pb2.POLICY_ACTION_ROLLED_BACK), key="policy")
        assert wait_for_version(stack, 0) == 0            # ROLLED_BACK: back to the initial weights


def wait_for_version(stack: Stack, version: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = stack.stub.GetInfo(generation_pb2.GetInfoRequest()).policy_version
        if seen == version:
            return seen
        time.sleep(0.2)
    return seen


# --- bad requests -----------------------------------------------------------------------

LONG = common_pb2.ChatMessage(role="user", content="word " * 400)

BAD_REQUESTS = [
    ("n", dict(params=dict(n=100)), ["params.n", "16"]),
    ("temperature", dict(params=dict(temperature=5.0)), ["params.temperature", "2"]),
    ("top_p", dict(params=dict(top_p=1.5)), ["params.top_p", "(0, 1]"]),
    ("max_tokens", dict(params=dict(max_tokens=5000)), ["params.max_tokens", "1024"]),
    ("max_tokens_room", dict(params=dict(max_tokens=250)), ["params.max_tokens", f"max_model_len={MAX_MODEL_LEN}"]),
    ("stop", dict(params=dict(stop=["a", "b", "c", "d", "e"])), ["params.stop", "4"]),
    ("priority", dict(params=dict(priority=101)), ["params.priority", "100"]),
    ("prompt_too_long", dict(messages=[LONG]), ["prompt", f"max_model_len is {MAX_MODEL_LEN}"]),
    ("role", dict(messages=[common_pb2.ChatMessage(role="robot", content="hi")]), ["messages[0].role", "user"]),
    ("token_range", dict(token_ids=[1, 10**7]), ["prompt_token_ids", "vocabulary"]),
    ("no_prompt", dict(), ["prompt"]),
]


@pytest.mark.parametrize("case,spec,needles", BAD_REQUESTS, ids=[c for c, _, _ in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_naming_field_and_limit(stack, case, spec, needles):
    req = generation_pb2.GenerateRequest(params=generation_pb2.SamplingParams(**spec.get("params", {})))
    if case != "no_prompt":
        if "token_ids" in spec:
            req.prompt_token_ids.ids.extend(spec["token_ids"])
        else:
            req.messages.messages.extend(spec.get("messages", QUESTION))
    for call in (stack.stub.Generate, lambda r, timeout: list(stack.stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for needle in needles:
            assert needle in e.value.details(), e.value.details()
