"""The learner as 2 torchrun-launched gloo ranks, through the real broker: it trains and
publishes versions, and SIGKILL of rank 1 mid-training, again and again, still trains every
rollout exactly once (the check of test_learner_crash.py); the same state then resumes as
one process and as 2 ranks again (a different world size), training only what is new.

    torchrun --standalone --nproc-per-node 2 -m services.learner
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from rlhf.bus import EventProducer
from rlhf.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.serving.client import sync_channel
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts
from rlhf.v1 import learner_pb2, learner_pb2_grpc
from rlhf.weightstore import WeightStore
from tests.integration.test_learner_crash import BATCH, learner_env, ledger_entries
from tests.procs import ServiceProcess

pytestmark = pytest.mark.slow

BATCHES = 6
KILL_DELAYS = (0.0, 0.5)  # seconds from a new ledger line to the kill of rank 1 (as in test_learner_crash)


class Torchrun(ServiceProcess):
    """The learner under torchrun: 2 local ranks, rank 0 serves gRPC on the env's port."""

    def command(self) -> list[str]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        return [*torchrun, "-m", "services.learner"]

    def rank_pid(self, rank: int, timeout: float = 60) -> int:
        """The pid of the worker torchrun started as `rank` (found by its environment: RANK and
        this learner's RLHF_PORT)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid, environ in _processes():
                if environ.get("RANK") == str(rank) and environ.get("RLHF_PORT") == str(self.port):
                    return pid
            time.sleep(0.1)
        raise TimeoutError(f"no rank {rank} under torchrun:\n{self.log()}")

    def kill_all(self) -> None:
        """SIGKILL torchrun and every rank it started (no orphan keeps the port or the broker)."""
        for pid, environ in _processes():
            if environ.get("RLHF_PORT") == str(self.port) and pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)


def _processes():
    """(pid, environment) of this user's processes, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        yield int(entry.name), {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def produce_rollouts(broker, topics, tiny_model_dir, batches: int, first_seed: int = 0) -> list:
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Question {i}?"}]) for i in range(BATCH)]
    reward = TokenSetReward(len(tok))
    produced = []
    for b in range(first_seed, first_seed + batches):
        produced += sample_rollouts(
            lm, lm, prompts, reward, policy_version=0, max_new_tokens=6, pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id, seed=b,
        )  # fmt: skip
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.rollouts, r, r.prompt_id) for r in produced])
    return produced


def train_all(run: ServiceProcess, rollouts: int):
    """Start the learner `run`, wait until it has trained `rollouts` in all, SIGTERM it;
    (run, its last status). Whatever is left of it is killed."""
    run.start()
    try:
        run.wait_serving(240)
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(run.address))
        deadline = time.monotonic() + 300
        while stub.GetStatus(learner_pb2.GetStatusRequest()).rollouts_trained < rollouts:
            assert time.monotonic() < deadline, run.log()
            time.sleep(0.2)
        status = stub.GetStatus(learner_pb2.GetStatusRequest())
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(120)
    finally:
        if run.proc.poll() is None:
            run.kill_all() if isinstance(run, Torchrun) else run.stop(signal.SIGKILL)
    return run, status


def test_two_ranks_train_through_the_broker_and_a_killed_rank_1_trains_nothing_twice(
    broker, topics, tiny_model_dir, tmp_path
):
    produced = produce_rollouts(broker, topics, tiny_model_dir, BATCHES)
    state_dir = tmp_path / "state"
    env = learner_env(broker, topics, tiny_model_dir, state_dir, dist_timeout_seconds=120)
    port = int(env["RLHF_PORT"])
    log = tmp_path / "learner.log"

    # 1. kill rank 1 after rank 0 wrote a new ledger line (+ a delay): torchrun then stops
    #    rank 0 and exits non-zero; start it again, as a supervisor would
    for delay in KILL_DELAYS:
        run = Torchrun("learner", env, log, port, 0).start()
        try:
            run.wait_serving(240)
            rank1 = run.rank_pid(1)
            steps_before = len(ledger_entries(state_dir))
            deadline = time.monotonic() + 180
            while len(ledger_entries(state_dir)) <= steps_before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            os.kill(rank1, signal.SIGKILL)
            assert run.proc.wait(120) != 0, "torchrun exited 0 after a rank was killed"
        finally:
            if run.proc.poll() is None:
                run.kill_all()
    # rank 0 saw rank 1 go: a collective failed mid-step (RankLost), or torchrun's SIGTERM
    # drained it and its stop command found no one to take it
    text = log.read_text(errors="replace")
    assert "RankLost" in text or "the other ranks did not take the stop" in text, "rank 0 did not see rank 1 go"

    # 2. the last incarnation trains the rest and stops cleanly (rank 0 tells rank 1 to stop)
    run, status = train_all(Torchrun("learner", env, log, port, 0), len(produced))
    # torchrun passes SIGTERM to both ranks and then exits non-zero itself (its
    # SignalException), so the clean stop shows in the log: rank 1 took rank 0's stop
    assert "rank 0 stopped; exiting" in run.log(400), run.log()

    # 3. the ledger: each rollout once, none missing; versions were published
    entries = ledger_entries(state_dir)
    trained = [event_id for e in entries for event_id in e["trained"]]
    assert len(trained) == len(set(trained)), "a rollout was trained twice"
    assert set(trained) == {r.event_id for r in produced}, "a rollout was skipped"
    assert [e["step"] for e in entries] == list(range(1, BATCHES + 1))
    assert status.step == BATCHES and status.rollouts_trained == len(produced)
    assert status.policy_version == BATCHES  # publish_every=1: one version per step
    stored = [r.version for r in WeightStore(state_dir / "weights").versions()]
    assert stored == list(range(BATCHES + 1)), stored  # v0 and one per step, gated and announced by rank 0
    assert "restored checkpoint" in log.read_text(errors="replace")
    assert "following rank 0" in log.read_text(errors="replace")

    # 4. the checkpoint does not depend on the world size: the 2-rank run resumes as one
    #    process, and that one's checkpoint as 2 ranks again, each training only what is new
    step = BATCHES
    for extra_seed, ranks in ((BATCHES, 1), (BATCHES + 2, 2)):
        produced += produce_rollouts(broker, topics, tiny_model_dir, 2, first_seed=extra_seed)
        cls = Torchrun if ranks == 2 else ServiceProcess
        _, status = train_all(cls("learner", env, log, port, 0), len(produced))
        assert status.step == step + 2, (ranks, status.step)  # resumed at `step`, not from scratch
        step = status.step
    entries = ledger_entries(state_dir)
    trained = [event_id for e in entries for event_id in e["trained"]]
    assert len(trained) == len(set(trained)) and set(trained) == {r.event_id for r in produced}
    assert [e["step"] for e in entries] == list(range(1, BATCHES + 5))
