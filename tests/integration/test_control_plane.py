"""Issue 12, item 3, on the real loop: learner, generator, reward, reference and rollout
worker from their entrypoints on loopback, the real broker, tiny models, one control token.

  1. the five control RPCs refuse a missing or wrong token (UNAUTHENTICATED) on the real
     generator and learner; reading stays open;
  2. with the token, a correctly hashed UpdateWeights for version 999999, which the learner
     never published, is refused (PERMISSION_DENIED naming why) and the generator keeps
     serving a published version; so is a bogus PolicyUpdate(PROMOTED, 999999) on Kafka;
  3. the loop keeps producing versions after both (the rollout worker is not frozen);
  4. a rollback to an older version is served, and the loop keeps producing versions after it.

Before this fix step 2 was accepted, the worker then waited for the learner to reach 999999
and the generator ignored every newer (smaller) version: step 3 timed out.
"""

from __future__ import annotations

import hashlib
import urllib.request
import uuid

import grpc
import pytest

from rlhf.bus import EventProducer, Topics, ensure_topics, new_event
from rlhf.serving.auth import control_metadata
from rlhf.serving.client import sync_channel
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc, learner_pb2, learner_pb2_grpc
from tests.procs import run_service, wait_for

pytestmark = pytest.mark.slow

TOKEN = "control-plane-test-token"
THREADS = {
    "RLHF_TORCH_THREADS": "1",
    "RLHF_REFERENCE_TORCH_THREADS": "1",
    "RLHF_REWARD_TORCH_THREADS": "1",
    "RLHF_LEARNER_TORCH_THREADS": "1",
}


def metric(svc, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def unauthenticated(call, *args, **kw) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=60, **kw)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    return e.value.details()


def test_unpublished_weights_are_refused_and_the_loop_keeps_producing_versions(tmp_path, broker, tiny_model_dir):
    topics = Topics(f"test-control-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, topics.all())
    weights = tmp_path / "state-learner" / "weights"  # the learner writes it, the generator reads it
    common = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_CONTROL_TOKEN": TOKEN,
        **THREADS,
    }
    learner_env = {
        **common,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": "4",
        "RLHF_LEARNER_MINIBATCH_SIZE": "4",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "4",
        "RLHF_LEARNER_PPO_EPOCHS": "1",
        "RLHF_LEARNER_PUBLISH_EVERY": "1",
        "RLHF_LEARNER_MAX_POLICY_LAG": "1",
        "RLHF_LEARNER_DRIFT_KL_BUDGET": "1000",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
    }
    with (
        run_service("learner", tmp_path, env=learner_env, timeout=300) as learner_svc,
        run_service(
            "reward", tmp_path, env={**common, "RLHF_REWARD_BACKBONE": "tiny", "RLHF_REWARD_MAX_TOKENS": "64"}
        ) as rm,
        run_service("reference", tmp_path, env={**common, "RLHF_MODEL": str(tiny_model_dir)}) as ref,
        run_service(
            "generator",
            tmp_path,
            env={
                **common,
                "RLHF_MODEL": str(tiny_model_dir),
                "RLHF_BACKEND": "transformers",
                "RLHF_WEIGHT_STORE": str(weights),
            },
        ) as gen,
        run_service(
            "rollout",
            tmp_path,
            env={
                **common,
                "RLHF_GENERATOR_ADDR": gen.address,
                "RLHF_REWARD_ADDR": rm.address,
                "RLHF_REFERENCE_ADDR": ref.address,
                "RLHF_LEARNER_ADDR": learner_svc.address,
                "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": "2",
                "RLHF_ROLLOUT_MAX_TOKENS": "8",
                "RLHF_LIVE_FRACTION": "0",
                "RLHF_ROLLOUT_CONCURRENCY": "1",
                "RLHF_ROLLOUT_VERSION_POLL_SECONDS": "0.3",
                "RLHF_ROLLOUT_MIN_RM_EXAMPLES": "0",
            },
        ) as worker,
        sync_channel(gen.address, control_token=TOKEN) as gen_ch,
        sync_channel(learner_svc.address, control_token=TOKEN) as learner_ch,
        sync_channel(gen.address) as gen_plain,
        sync_channel(learner_svc.address) as learner_plain,
    ):
        generator = generation_pb2_grpc.GenerationServiceStub(gen_ch)
        learner = learner_pb2_grpc.LearnerServiceStub(learner_ch)
        status = lambda: learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30)  # noqa: E731
        served = lambda: generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=30).policy_version  # noqa: E731
        logs = lambda: "\n\n".join(f"--- {s.name}\n{s.log(60)}" for s in (learner_svc, gen, worker))  # noqa: E731

        def promoted() -> set[int]:
            return {
                v.version
                for v in learner.ListVersions(learner_pb2.ListVersionsRequest(), timeout=30).versions
                if v.promoted
            }

        wait_for(lambda: status().policy_version >= 2, 300, "the loop making versions", detail=logs)

        # 1. no token, a wrong token: refused on both services, reading open
        g, lr = generation_pb2_grpc.GenerationServiceStub(gen_plain), learner_pb2_grpc.LearnerServiceStub(learner_plain)
        data = (tiny_model_dir / "model.safetensors").read_bytes()

        def update(version: int):
            yield generation_pb2.WeightChunk(
                header=generation_pb2.WeightHeader(
                    version=version,
                    format=common_pb2.WEIGHT_FORMAT_FULL,
                    total_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
            for i in range(0, len(data), 1 << 20):
                yield generation_pb2.WeightChunk(data=data[i : i + (1 << 20)])

        for metadata in ((), control_metadata("guessed")):
            for call, request in (
                (g.UpdateWeights, update(999999)),
                (g.LoadVersion, generation_pb2.LoadVersionRequest(version=0)),
                (lr.Pause, learner_pb2.PauseRequest()),
                (lr.Resume, learner_pb2.ResumeRequest()),
                (lr.Rollback, learner_pb2.RollbackRequest(version=0)),
            ):
                assert "RLHF_CONTROL_TOKEN" in unauthenticated(call, request, metadata=metadata)
        assert not lr.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).paused

        # 2. with the token: version 999999 was never published, so it is refused
        with pytest.raises(grpc.RpcError) as e:
            generator.UpdateWeights(update(999999), timeout=120)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "version 999999 was never published by the learner" in e.value.details()
        assert served() in promoted()
        #    and a bogus announcement on Kafka is ignored, counted
        ignored = metric(gen, 'rlhf_generator_policy_events_invalid_total{reason="not_in_store"}')
        with EventProducer(broker.bootstrap) as producer:
            producer.publish(
                topics.policy_updates,
                new_event(
                    events_pb2.PolicyUpdate,
                    version=999999,
                    sha256=hashlib.sha256(data).hexdigest(),
                    format=common_pb2.WEIGHT_FORMAT_FULL,
                    action=events_pb2.POLICY_ACTION_PROMOTED,
                ),
                key="policy",
            )
        wait_for(
            lambda: metric(gen, 'rlhf_generator_policy_events_invalid_total{reason="not_in_store"}') > ignored,
            60,
            "the bogus PolicyUpdate counted as ignored",
            detail=logs,
        )

        # 3. the loop goes on: two more versions, and the generator serves a published one after them
        after_attack = status().policy_version
        wait_for(lambda: status().policy_version >= after_attack + 2, 300, "two versions after the attack", detail=logs)
        newest = max(promoted())
        wait_for(
            lambda: served() >= after_attack + 1,
            120,
            "the generator serving a version made after the attack",
            detail=logs,
        )
        assert served() in promoted() and served() != 999999

        # 4. a rollback to an older version is served, and the loop goes on after it
        target = min(v for v in promoted() if v >= 1)
        assert learner.Rollback(learner_pb2.RollbackRequest(version=target), timeout=120).version == target
        wait_for(
            lambda: (
                metric(gen, 'rlhf_generator_policy_events_total{action="POLICY_ACTION_ROLLED_BACK",outcome="loaded"}')
                >= 1
            ),
            120,
            "the generator loading the rollback",
            detail=logs,
        )
        after_rollback = status().policy_version
        wait_for(
            lambda: status().policy_version >= after_rollback + 2, 300, "two versions after the rollback", detail=logs
        )
        assert status().policy_version > newest
        assert metric(worker, "rlhf_rollouts_total") > 0
