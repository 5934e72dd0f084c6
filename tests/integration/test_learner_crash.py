"""SIGKILL the learner mid-training, again and again, restart it each time: every rollout
ends up trained exactly once — the ledger shows no duplicates and no gaps."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rlhf.bus import EventProducer
from rlhf.durability import read_jsonl
from rlhf.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.serving.client import sync_channel
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts
from rlhf.v1 import learner_pb2, learner_pb2_grpc
from tests.procs import ServiceProcess, free_port

BATCH = 4
BATCHES = 12
# seconds from a new ledger line to the kill: 0 lands in the checkpoint/commit/publish that
# follow the line, the others anywhere in the next step
KILL_DELAYS = (0.0, 0.7, 0.0, 1.3)


def ledger_entries(state_dir) -> list[dict]:
    # a torn last line (what a kill mid-append leaves, cut on the next start) is skipped
    return read_jsonl(state_dir / "learner" / "ledger.jsonl")


def learner_env(broker, topics, tiny_model_dir, state_dir, **learner) -> dict[str, str]:
    """The learner service's environment for these tests; `learner` adds RLHF_LEARNER_* settings."""
    return {
        **os.environ,
        "RLHF_HOST": "127.0.0.1",
        "RLHF_PORT": str(free_port()),
        "RLHF_METRICS_PORT": "0",
        "RLHF_STATE_DIR": str(state_dir),
        "RLHF_DRAIN_SECONDS": "1",
        "RLHF_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": str(BATCH),
        "RLHF_LEARNER_MINIBATCH_SIZE": "2",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "2",
        "RLHF_LEARNER_PPO_EPOCHS": "1",
        "RLHF_LEARNER_MAX_POLICY_LAG": "1000",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
        "RLHF_LEARNER_TORCH_THREADS": "1",
        **{f"RLHF_LEARNER_{k.upper()}": str(v) for k, v in learner.items()},
    }


def kill_restart_until_trained(env: dict[str, str], state_dir, log, expected: int):
    """SIGKILL the learner after each of KILL_DELAYS, restarting it each time; then one last
    incarnation trains until `expected` rollouts and stops cleanly. Returns its last status."""
    port = int(env["RLHF_PORT"])
    # 2. kill it at some moment after it has made progress, restart, repeat
    for delay in KILL_DELAYS:
        svc = ServiceProcess("learner", env, log, port, 0).start()
        try:
            svc.wait_serving(180)
            steps_before = len(ledger_entries(state_dir))
            deadline = time.monotonic() + 120
            while len(ledger_entries(state_dir)) <= steps_before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            svc.proc.send_signal(signal.SIGKILL)
            svc.proc.wait(30)

    # 3. the last incarnation finishes the work and stops cleanly
    svc = ServiceProcess("learner", env, log, port, 0).start()
    try:
        svc.wait_serving(180)
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(svc.address))
        deadline = time.monotonic() + 300
        while stub.GetStatus(learner_pb2.GetStatusRequest()).rollouts_trained < expected:
            assert time.monotonic() < deadline, svc.log()
            time.sleep(0.2)
        return stub.GetStatus(learner_pb2.GetStatusRequest())
    finally:
        assert svc.stop(signal.SIGTERM) == 0, svc.log()


@pytest.mark.slow
def test_sigkill_at_any_moment_trains_every_rollout_exactly_once(broker, topics, tiny_model_dir, tmp_path):
    # 1. every rollout up front: 12 batches from the base policy (lag is not the point here)
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Question {i}?"}]) for i in range(BATCH)]
    reward = TokenSetReward(len(tok))
    produced = []
    for b in range(BATCHES):
        produced += sample_rollouts(
            lm,
            lm,
            prompts,
            reward,
            policy_version=0,
            max_new_tokens=6,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            seed=b,
        )
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.rollouts, r, r.prompt_id) for r in produced])

    state_dir = tmp_path / "state"
    env = learner_env(broker, topics, tiny_model_dir, state_dir)
    status = kill_restart_until_trained(env, state_dir, tmp_path / "learner.log", len(produced))

    # 4. the ledger (the restored model's history): each rollout once, none missing
    entries = ledger_entries(state_dir)
    trained = [event_id for e in entries for event_id in e["trained"]]
    assert len(trained) == len(set(trained)), "a rollout was trained twice"
    assert set(trained) == {r.event_id for r in produced}, "a rollout was skipped"
    assert [e["step"] for e in entries] == list(range(1, BATCHES + 1))
    assert status.step == BATCHES and status.rollouts_trained == len(produced)
    assert entries[-1]["offsets"] == [[topics.rollouts, 0, len(produced)]]
    assert "restored checkpoint" in (tmp_path / "learner.log").read_text()
