"""A full-weight canary candidate (issue 15), end to end: the generator from its real
entrypoint (transformers backend) following PolicyUpdate events on the real broker.

Where memory permits, CANARY naming full weights loads them as a second model copy: requests
naming the candidate get its own tokens (log-probs checked against a plain forward of those
weights), the others the stable version's. With `RLHF_CANDIDATE_MEMORY_LIMIT_GIB` forced below
what a copy needs, the candidate is refused with one line naming the bytes needed and
available, and the stable version serves on alone.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import load_file

from rlhf.bus import EventProducer, Topics, ensure_topics, new_event
from rlhf.models import load_causal_lm, sequence_logprobs
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.integration.test_generation_canary import ABS_TOL, generate
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

FULL_CANDIDATE = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_model_dir_b, broker):
    """Version 1: another tiny model's full weights, stored promoted; topics of this module's own."""
    tmp = tmp_path_factory.mktemp("gen-full-candidate")
    store = WeightStore(tmp / "weights")
    store.put(FULL_CANDIDATE, load_file(str(tiny_model_dir_b / "model.safetensors")), meta={"promoted": True})
    topics = Topics(f"test-gen-full-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, topics.all())
    record = store.get(FULL_CANDIDATE)
    event = new_event(
        events_pb2.PolicyUpdate,
        version=FULL_CANDIDATE,
        action=events_pb2.POLICY_ACTION_CANARY,
        sha256=record.sha256,
        format=common_pb2.WEIGHT_FORMAT_FULL,
        uri=str(record.path),
        stable_version=0,
        candidate_version=FULL_CANDIDATE,
        canary_share=0.5,
    )
    with EventProducer(broker.bootstrap) as producer:
        producer.publish(topics.policy_updates, event, key="policy")
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "transformers",
        "RLHF_MAX_MODEL_LEN": "256",
        "RLHF_WEIGHT_STORE": str(store.root),
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_FOLLOW_POLICY_UPDATES": "true",
    }
    return tmp, env


def info(stub) -> tuple[int, int]:
    i = stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=30)
    return i.policy_version, i.candidate_version


def worst_gap(resp: generation_pb2.GenerateResponse, model) -> float:
    s = resp.samples[0]
    ref = sequence_logprobs(model, list(resp.prompt_token_ids), list(s.token_ids))
    return (ref - torch.tensor(list(s.logprobs))).abs().max().item()


def test_a_full_weight_candidate_serves_its_own_tokens(setup, tiny_model_dir, tiny_model_dir_b):
    tmp, env = setup
    base, other = load_causal_lm(tiny_model_dir).eval(), load_causal_lm(tiny_model_dir_b).eval()
    (tmp / "served").mkdir()
    with run_service("generator", tmp / "served", env=env, timeout=600) as svc:
        with sync_channel(svc.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            wait_for(lambda: info(stub) == (0, FULL_CANDIDATE), 120, "the full-weight candidate served")
            cand, stable = generate(stub, FULL_CANDIDATE), generate(stub, 0)
    assert (cand.policy_version, stable.policy_version) == (FULL_CANDIDATE, 0)
    assert worst_gap(cand, other) < ABS_TOL  # the candidate's own weights
    assert worst_gap(stable, base) < ABS_TOL  # the stable version untouched
    assert worst_gap(cand, base) > 1e-3  # and not the stable one's (two random tiny models may agree on tokens)


def test_a_full_weight_candidate_is_refused_below_the_memory_it_needs(setup):
    tmp, env = setup
    (tmp / "refused").mkdir()
    # ~1 MiB: less than weights + margin; JSON logs carry the refusal's reason as a field
    limited = {**env, "RLHF_CANDIDATE_MEMORY_LIMIT_GIB": "0.001", "RLHF_LOG_FORMAT": "json"}
    with run_service("generator", tmp / "refused", env=limited, timeout=600) as svc:
        with sync_channel(svc.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            log = tmp / "refused" / "generator.log"
            wait_for(lambda: "a second model copy needs" in log.read_text(), 120, "the refusal logged")
            assert info(stub) == (0, 0)  # the stable version serves on alone
            assert generate(stub, 0).policy_version == 0
    line = next(ln for ln in log.read_text().splitlines() if "a second model copy needs" in ln)
    assert "full-weight candidate" in line and "bytes" in line and "are available" in line, line
