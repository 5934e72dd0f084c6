"""The learner against the real broker: its real entrypoint and control plane, and the
drift gate, with the tiny model and rollouts sampled from it."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from rlhf.bus import EventConsumer, EventProducer, new_event
from rlhf.errors import FailedPrecondition
from rlhf.learner import Learner, LearnerConfig
from rlhf.learner.loop import MAX_FAILED_STEPS_IN_A_ROW
from rlhf.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.serving.auth import control_metadata
from rlhf.serving.client import check_health, sync_channel
from rlhf.serving.server import status_code
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts
from rlhf.v1 import common_pb2, events_pb2, learner_pb2, learner_pb2_grpc
from rlhf.weightstore import sha256_file
from tests.integration.test_dead_letters import dead_letters, metrics_text, sample, why
from tests.procs import run_service, wait_for


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    """make(n, version, seed) → n Rollout events sampled from the tiny base model."""
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    reward = TokenSetReward(len(tok))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Question {i}?"}]) for i in range(8)]

    def make(n: int, version: int, seed: int):
        return sample_rollouts(
            lm,
            lm,
            prompts[:n],
            reward,
            version,
            max_new_tokens=6,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            seed=seed,
        )

    return make


def publish(bootstrap: str, topic: str, events) -> None:
    with EventProducer(bootstrap) as producer:
        producer.publish_many([(topic, e, e.prompt_id) for e in events])


def policy_updates(bootstrap: str, topic: str, n: int) -> list[events_pb2.PolicyUpdate]:
    consumer = EventConsumer(bootstrap, topic, events_pb2.PolicyUpdate, group_id="test-reader")
    got: list = []
    try:
        wait_for(
            lambda: got.extend(r.event for r in consumer.poll(timeout_ms=200)) or len(got) >= n,
            60,
            f"{n} policy updates",
        )
    finally:
        consumer.close()
    return got


def invalid_rollout():
    return new_event(
        events_pb2.Rollout,
        prompt_id="bad",
        prompt_token_ids=[1, 2],
        response_token_ids=[3, 4],
        logprobs=[-1.0],
        ref_logprobs=[-1.0, -1.0],
        policy_version=0,
    )


def test_learner_service_trains_publishes_and_obeys_its_control_plane(
    broker, topics, tiny_model_dir, tmp_path, sampler
):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": "4",
        "RLHF_LEARNER_MINIBATCH_SIZE": "2",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "2",
        "RLHF_LEARNER_PPO_EPOCHS": "1",
        "RLHF_LEARNER_MAX_POLICY_LAG": "1",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
        "RLHF_LEARNER_TORCH_THREADS": "1",
        "RLHF_CONTROL_TOKEN": "learner-test-token",
    }
    with run_service("learner", tmp_path, env=env, timeout=180) as svc:
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address, control_token="learner-test-token"))
        # 0. Pause, Resume, Rollback need the control token; reading does not
        plain = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address))
        for call, request in (
            (plain.Pause, learner_pb2.PauseRequest()),
            (plain.Resume, learner_pb2.ResumeRequest()),
            (plain.Rollback, learner_pb2.RollbackRequest(version=0)),
        ):
            for metadata in ((), control_metadata("wrong")):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=metadata, timeout=30)
                assert (
                    err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "RLHF_CONTROL_TOKEN" in err.value.details()
                )
        assert not plain.GetStatus(learner_pb2.GetStatusRequest()).paused
        status = lambda: stub.GetStatus(learner_pb2.GetStatusRequest())  # noqa: E731
        assert (status().step, status().serving_version, status().paused) == (0, 0, False)
        [v0] = stub.ListVersions(learner_pb2.ListVersionsRequest()).versions
        assert v0.version == 0 and v0.promoted and v0.format == common_pb2.WEIGHT_FORMAT_LORA

        # 1. a batch (plus one malformed rollout, dropped and counted) → step 1, version 1
        first = sampler(4, version=0, seed=1)
        publish(broker.bootstrap, topics.rollouts, [invalid_rollout(), *first])
        wait_for(lambda: status().step == 1, 120, "step 1")
        s = status()
        assert s.rollouts_trained == 4 and s.policy_version == 1
        for key in ("kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance"):
            assert key in s.last_stats, key
        # the serving version is re-announced at start-up (a restarted generator or worker learns it)
        [announced, update] = policy_updates(broker.bootstrap, topics.policy_updates, 2)
        assert (announced.version, announced.action) == (0, events_pb2.POLICY_ACTION_PROMOTED)
        assert update.action == events_pb2.POLICY_ACTION_PROMOTED and update.version == 1
        assert update.format == common_pb2.WEIGHT_FORMAT_LORA
        assert (
            sha256_file(tmp_path / "state-learner" / "weights" / "v000001" / "adapter_model.safetensors")
            == update.sha256
        )
        wait_for(lambda: status().serving_version == 1, 120, "serving version 1")

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
        for name in (
            "rlhf_learner_kl_nats ",
            "rlhf_learner_kl_coef ",
            "rlhf_learner_reward_mean ",
            "rlhf_learner_score_mean ",
            "rlhf_learner_entropy_nats ",
            "rlhf_learner_clipped_tokens_ratio ",
            "rlhf_learner_approx_kl_nats ",
            "rlhf_learner_value_loss ",
            "rlhf_learner_explained_variance ",
            "rlhf_learner_response_length_tokens ",
            "rlhf_learner_staleness_versions ",
            "rlhf_learner_tokens_per_second ",
            "rlhf_learner_drift_kl_nats ",
        ):
            assert name in metrics, name
        assert 'rlhf_learner_rollouts_invalid_total{reason="lengths"} 1.0' in metrics
        assert "rlhf_learner_rollouts_trained_total 4.0" in metrics

        # 2. paused: rollouts wait in Kafka; resumed: they are trained
        assert stub.Pause(learner_pb2.PauseRequest()).paused
        second = sampler(4, version=1, seed=2)
        publish(broker.bootstrap, topics.rollouts, second)
        time.sleep(2.0)
        assert status().step == 1
        assert not stub.Resume(learner_pb2.ResumeRequest()).paused
        wait_for(lambda: status().step == 2, 120, "step 2 after resume")

        # 3. rollouts more than max_policy_lag versions behind are dropped and counted
        publish(broker.bootstrap, topics.rollouts, sampler(4, version=0, seed=3))
        wait_for(lambda: status().rollouts_dropped_stale == 4, 120, "4 stale rollouts dropped")
        assert status().step == 2

        # 4. rollback: to a promoted version; unknown versions are refused with the reason
        info = stub.Rollback(learner_pb2.RollbackRequest(version=1))
        assert info.version == 1 and info.promoted
        assert status().serving_version == 1 and status().policy_version == 2
        updates = policy_updates(broker.bootstrap, topics.policy_updates, 4)
        assert [(u.version, u.action) for u in updates] == [
            (0, events_pb2.POLICY_ACTION_PROMOTED),
            (1, events_pb2.POLICY_ACTION_PROMOTED),
            (2, events_pb2.POLICY_ACTION_PROMOTED),
            (1, events_pb2.POLICY_ACTION_ROLLED_BACK),
        ]
        with pytest.raises(grpc.RpcError) as err:
            stub.Rollback(learner_pb2.RollbackRequest(version=42))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "42" in err.value.details()

        assert svc.stop(signal.SIGTERM) == 0, svc.log()

    ledger = [json.loads(line) for line in (tmp_path / "state-learner" / "learner" / "ledger.jsonl").open()]
    trained = [i for e in ledger for i in e["trained"]]
    assert sorted(trained) == sorted(r.event_id for r in first + second)
    assert sum(len(e["invalid"]) for e in ledger) == 1


def test_drift_gate_rejects_a_version_over_budget(broker, topics, tiny_model_dir, tmp_path, sampler):
    cfg = LearnerConfig(
        finetune="full",
        lr=0.02,
        batch_size=4,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=2,
        drift_kl_budget=0.0,
        drift_max_new_tokens=4,
        drift_samples_per_prompt=1,
    )
    learner = Learner(cfg, tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    rejections = REGISTRY.get_sample_value("rlhf_learner_drift_gate_rejections_total") or 0.0
    try:
        v0_weights = {k: v.clone() for k, v in learner.policy.policy_state_dict().items()}
        learner.intake.add([_record(topics.rollouts, e, i) for i, e in enumerate(sampler(4, version=0, seed=4))])
        learner._train(learner.intake.take_batch())

        v1 = next(v for v in learner.versions() if v.version == 1)
        assert not v1.promoted and "exceeds budget" in v1.reason and v1.kl_to_reference > 0
        assert learner.status()["serving_version"] == 0
        assert REGISTRY.get_sample_value("rlhf_learner_drift_gate_rejections_total") == rejections + 1
        [_, update] = policy_updates(broker.bootstrap, topics.policy_updates, 2)  # v0 re-announced, v1
        assert update.action == events_pb2.POLICY_ACTION_REJECTED and update.kl_budget == 0.0
        assert "exceeds budget" in update.reason

        # on_reject="revert": training goes on from the serving weights, so their rollouts stay fresh
        assert learner.state.lineage == [0]
        for k, v in learner.policy.policy_state_dict().items():
            assert torch.equal(v, v0_weights[k]), k
        with pytest.raises(FailedPrecondition) as err:
            learner.rollback(1)
        assert status_code(err.value).name == "FAILED_PRECONDITION" and "never promoted" in str(err.value)
    finally:
        learner.close()


def variant(good: events_pb2.Rollout, **fields) -> events_pb2.Rollout:
    """A copy of a sampled rollout under a new event id, with some fields replaced."""
    bad = events_pb2.Rollout()
    bad.CopyFrom(good)
    bad.event_id = new_event(events_pb2.Rollout).event_id
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(bad, name)[:] = value
        else:
            setattr(bad, name, value)
    return bad


def test_learner_service_dead_letters_oov_and_nan_rollouts_and_keeps_training(
    broker, topics, tiny_model_dir, tmp_path, sampler
):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": "4",
        "RLHF_LEARNER_MINIBATCH_SIZE": "2",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "2",
        "RLHF_LEARNER_PPO_EPOCHS": "1",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
        "RLHF_LEARNER_TORCH_THREADS": "1",
    }
    first = sampler(4, version=0, seed=5)
    nan = float("nan")
    bad = {  # each decodes; each used to kill the learner or poison its weights
        "oov": variant(first[0], prompt_token_ids=[1, 2, 10_000_000]),
        "nan-logprob": variant(first[1], logprobs=[nan] * len(first[1].logprobs)),
        "nan-score": variant(first[2], score=nan),
        "forged-version": variant(first[3], policy_version=999_999),
    }
    expected = {
        "oov": "token_id: prompt_token_ids[2] = 10000000 is outside the policy's vocabulary [0, ",
        "nan-logprob": "non_finite: logprobs[0] = nan",
        "nan-score": "non_finite: score = nan",
        "forged-version": "version: policy_version 999999 was never given out by this learner (latest 0)",
    }
    with run_service("learner", tmp_path, env=env, timeout=180) as svc:
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address))
        status = lambda: stub.GetStatus(learner_pb2.GetStatusRequest())  # noqa: E731

        # 1. the bad ones first, then a good batch: it trains (step 1, version 1)
        publish(broker.bootstrap, topics.rollouts, [*bad.values(), *first])
        wait_for(lambda: status().step == 1, 120, "step 1 past the bad rollouts", detail=svc.log)
        # 2. and training goes on from the new version
        second = sampler(4, version=1, seed=6)
        publish(broker.bootstrap, topics.rollouts, second)
        wait_for(lambda: status().step == 2, 120, "step 2", detail=svc.log)
        assert status().rollouts_trained == 8
        assert check_health(svc.address, timeout=5) == "SERVING" and svc.proc.poll() is None

        dead = {m.value: m for m in dead_letters(broker.bootstrap, topics.rollouts, len(bad))}
        for name, event in bad.items():
            message = dead[event.SerializeToString()]  # the original bytes, byte for byte
            assert why(message).startswith(expected[name]), (name, why(message))
            assert dict(message.headers)["dlq.group"] == b"learner"
        text = metrics_text(svc)
        for reason, n in (("token_id", 1), ("non_finite", 2), ("version", 1)):
            assert sample(text, "rlhf_learner_rollouts_invalid_total", reason=reason) == n, reason
        assert sample(text, "rlhf_kafka_dlq_messages_total", reason="invalid", topic=topics.rollouts) == 4
        assert "rlhf_learner_steps_total 2.0" in text
        assert svc.stop(signal.SIGTERM) == 0, svc.log()

    ledger = [json.loads(line) for line in (tmp_path / "state-learner" / "learner" / "ledger.jsonl").open()]
    assert sorted(i for e in ledger for i in e["invalid"]) == sorted(e.event_id for e in bad.values())
    assert sorted(i for e in ledger for i in e["trained"]) == sorted(e.event_id for e in first + second)
    # the checkpoint (what a restart seeks to) is past the dead letters: they are not read again
    assert ledger[-1]["offsets"] == [[topics.rollouts, 0, len(bad) + 8]]


def test_a_ppo_step_that_raises_is_contained(broker, topics, tiny_model_dir, tmp_path, sampler):
    cfg = LearnerConfig(
        batch_size=4,
        minibatch_size=2,
        micro_batch_size=2,
        ppo_epochs=1,
        drift_max_new_tokens=4,
        drift_samples_per_prompt=1,
    )
    learner = Learner(cfg, tiny_model_dir, tmp_path / "state", broker.bootstrap, topics.prefix)
    learner.start()
    try:
        weights = {k: v.clone() for k, v in learner.policy.policy_state_dict().items()}
        # a batch validation would refuse, handed to the step directly: the step raises IndexError
        poisoned = sampler(4, version=0, seed=7)
        poisoned[2] = variant(poisoned[2], response_token_ids=[10_000_000] * len(poisoned[2].logprobs))
        learner._train([_record(topics.rollouts, e, i) for i, e in enumerate(poisoned)])

        s = learner.status()
        assert (s["step"], learner.state.steps_failed, learner.state.rollouts_failed) == (0, 1, 4)
        for k, v in learner.policy.policy_state_dict().items():
            assert torch.equal(v, weights[k]), k  # undone
        dead = dead_letters(broker.bootstrap, topics.rollouts, 4)
        assert sorted(m.value for m in dead) == sorted(e.SerializeToString() for e in poisoned)
        assert all(why(m).startswith("PPO step failed: IndexError") for m in dead)
        assert (
            REGISTRY.get_sample_value("rlhf_kafka_dlq_messages_total", {"topic": topics.rollouts, "reason": "failed"})
            == 4
        )

        # the learner keeps stepping: the next batch trains, its ledger line names the failed one
        good = sampler(4, version=0, seed=8)
        learner.intake.add([_record(topics.rollouts, e, 4 + i) for i, e in enumerate(good)])
        learner._train(learner.intake.take_batch())
        assert learner.status()["step"] == 1
        line = learner.ledger.entries()[-1]
        assert line["failed"] == [e.event_id for e in poisoned] and len(line["trained"]) == 4

        # a learner that cannot train any batch stops containing it, loudly
        for n in range(MAX_FAILED_STEPS_IN_A_ROW):
            batch = [
                _record(topics.rollouts, variant(e, prompt_token_ids=[10_000_000]), 8 + 4 * n + i)
                for i, e in enumerate(good)
            ]
            if n < MAX_FAILED_STEPS_IN_A_ROW - 1:
                learner._train(batch)
            else:
                with pytest.raises(RuntimeError, match="PPO steps in a row failed"):
                    learner._train(batch)
    finally:
        learner.close()


def _record(topic: str, event, offset: int):
    from rlhf.bus import Record

    return Record(
        topic=topic, partition=0, offset=offset, key=None, event=event, headers={}, value=event.SerializeToString()
    )
