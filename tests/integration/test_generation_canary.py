"""Two versions served at once (issue 15), end to end: the generator from its real entrypoint
(transformers backend, and vLLM's, where the candidate is one more LoRARequest) following
PolicyUpdate events on the real broker, as a learner that runs canaries publishes them (the
whole serving state in every event).

CANARY loads its version as the candidate beside the stable one; requests naming 0, the
stable or the candidate get the version they name (checked through their log-probs against
peft's forward of that adapter), any other is FAILED_PRECONDITION naming the versions
served; GetInfo reports the candidate and its share; PROMOTED naming the candidate as stable
promotes it, ROLLED_BACK with candidate 0 drops it; a restarted generator replays the topic
to the same state.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import torch

from rlhf.bus import EventProducer, Topics, ensure_topics, new_event
from rlhf.models import load_causal_lm, sequence_logprobs
from rlhf.serving.client import sync_channel
from rlhf.testing.lora import make_random_lora
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

TOKEN = "canary-test-token"
ABS_TOL = 1e-4  # as tests/integration/test_generation_service.py
QUESTION = [common_pb2.ChatMessage(role="user", content="Name three colours.")]
CANARY, PROMOTED, ROLLED_BACK = (
    events_pb2.POLICY_ACTION_CANARY,
    events_pb2.POLICY_ACTION_PROMOTED,
    events_pb2.POLICY_ACTION_ROLLED_BACK,
)


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def setup(request, tmp_path_factory, tiny_model_dir, broker):
    """Versions 1, 2, 3: LoRA adapters on the initial weights, stored promoted (as the
    learner stores what passed the drift gate), and topics of this backend's own."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"gen-canary-{backend}")
    store = WeightStore(tmp / "weights")
    adapters: dict[int, Path] = {}
    for version in (1, 2, 3):
        adapters[version] = tmp / f"lora{version}"
        tensors, cfg = make_random_lora(tiny_model_dir, adapters[version], rank=8, seed=version)
        store.put(version, tensors, fmt="lora", adapter_config=cfg, meta={"promoted": True})
    topics = Topics(f"test-gen-canary-{backend}-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, topics.all())
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": backend,
        "RLHF_MAX_MODEL_LEN": "256",
        "RLHF_WEIGHT_STORE": str(store.root),
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_FOLLOW_POLICY_UPDATES": "true",
        "RLHF_CONTROL_TOKEN": TOKEN,
    }
    return tmp, store, adapters, topics, env, broker.bootstrap


def fresh(folder: Path) -> Path:
    """A generator's own folder (log, state): each start is another process, one topic."""
    folder.mkdir()
    return folder


def publish(setup, action: int, version: int, stable: int = 0, candidate: int = 0, share: float = 0.0) -> None:
    _, store, _, topics, _, bootstrap = setup
    record = store.get(version)
    event = new_event(
        events_pb2.PolicyUpdate,
        version=version,
        action=action,
        sha256=record.sha256,
        format=common_pb2.WEIGHT_FORMAT_LORA,
        uri=str(record.path),
        stable_version=stable,
        candidate_version=candidate,
        canary_share=share,
    )
    with EventProducer(bootstrap) as producer:
        producer.publish(topics.policy_updates, event, key="policy")


def info(stub) -> tuple[int, int, float]:
    i = stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=30)
    return i.policy_version, i.candidate_version, round(i.canary_share, 6)


def wait_state(stub, want: tuple[int, int, float]) -> None:
    wait_for(lambda: info(stub) == want, 120, f"the generator serving (stable, candidate, share) = {want}")


def generate(stub, policy_version: int) -> generation_pb2.GenerateResponse:
    return stub.Generate(
        generation_pb2.GenerateRequest(
            messages=common_pb2.ChatMessages(messages=QUESTION),
            params=generation_pb2.SamplingParams(max_tokens=12, temperature=0.0),
            policy_version=policy_version,
        ),
        timeout=120,
    )


def stream_versions(stub, policy_version: int) -> set[int]:
    req = generation_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(messages=QUESTION),
        params=generation_pb2.SamplingParams(max_tokens=6, temperature=1.0, seed=3),
        policy_version=policy_version,
    )
    return {p.policy_version for p in stub.GenerateStream(req, timeout=120)}


def not_served(stub, policy_version: int) -> str:
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, policy_version)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
    return e.value.details()


_models: dict[int, torch.nn.Module] = {}


def assert_from(resp: generation_pb2.GenerateResponse, version: int, tiny_model_dir: Path, adapters) -> None:
    """The response's log-probs are those of base + adapter `version` (peft, unmerged)."""
    from peft import PeftModel

    if version not in _models:
        _models[version] = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), adapters[version]).eval()
    s = resp.samples[0]
    ref = sequence_logprobs(_models[version], list(resp.prompt_token_ids), list(s.token_ids))
    worst = (ref - torch.tensor(list(s.logprobs))).abs().max().item()
    assert worst < ABS_TOL, f"log-probs differ from version {version}'s forward by {worst:.2e}"


def test_canary_events_drive_what_is_served_and_a_restart_replays_them(setup, tiny_model_dir):
    tmp, _, adapters, _, env, _ = setup
    publish(setup, PROMOTED, 1)  # an old-style event first: version 1 is the one version served
    publish(setup, CANARY, 2, stable=1, candidate=2, share=0.25)
    with run_service("generator", fresh(tmp / "first"), env=env, timeout=600) as svc:
        with sync_channel(svc.address, control_token=TOKEN) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            wait_state(stub, (1, 2, 0.25))
            for asked, served in [(0, 1), (1, 1), (2, 2)]:
                resp = generate(stub, asked)
                assert resp.policy_version == served
                assert_from(resp, served, tiny_model_dir, adapters)
            assert stream_versions(stub, 2) == {2} and stream_versions(stub, 0) == {1}
            details = not_served(stub, 7)
            assert "version 7 is not served" in details and "stable v1 and candidate v2" in details
            with pytest.raises(grpc.RpcError) as e:
                generate(stub, -1)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy_version" in e.value.details()

    # a restart replays the topic to the same state
    with run_service("generator", fresh(tmp / "second"), env=env, timeout=600) as svc:
        with sync_channel(svc.address, control_token=TOKEN) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            wait_state(stub, (1, 2, 0.25))
            assert_from(generate(stub, 2), 2, tiny_model_dir, adapters)

            # promotion: the candidate is the stable version, no candidate
            publish(setup, PROMOTED, 2, stable=2, candidate=0, share=0.25)
            wait_state(stub, (2, 0, 0.0))
            resp = generate(stub, 0)
            assert resp.policy_version == 2
            assert_from(resp, 2, tiny_model_dir, adapters)
            assert "version 1 is not served" in not_served(stub, 1)

            # a new canary, rolled back: the candidate is dropped, the stable serves on
            publish(setup, CANARY, 3, stable=2, candidate=3, share=0.5)
            wait_state(stub, (2, 3, 0.5))
            resp = generate(stub, 3)
            assert resp.policy_version == 3
            assert_from(resp, 3, tiny_model_dir, adapters)
            publish(setup, ROLLED_BACK, 2, stable=2, candidate=0, share=0.5)
            wait_state(stub, (2, 0, 0.0))
            assert "stable v2 (0 = the stable version)" in not_served(stub, 3)
            assert_from(generate(stub, 2), 2, tiny_model_dir, adapters)
