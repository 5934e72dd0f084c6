"""The restart scenario of issue 12, in real processes: `rlhf up --tiny`, feedback, SIGKILL
of `rlhf up` (its children and the in-memory embedded broker die with it), the same
`rlhf up --state-dir` again, more feedback. The broker comes back empty; the reward
service and the learner find their checkpointed offsets belong to a lost log and read the
new one from its start, the gateway's outbox re-sends what the old log held, and

  * every feedback event accepted before and after the restart is trained exactly once:
    the RM's examples_seen (Reward GetInfo) equals the number of accepted events that carry
    a training signal — each such event, thumbs or comparison, is exactly one example
    (rlhf.reward.data.FeedbackConverter); an empty answer or two identical answers carry
    none, and we count those from the outbox itself;
  * the learner steps again (GetStatus.step grows past its restored step);
  * the lost log is visible: an ERROR line naming the topic in the reward, learner and
    gateway logs.

A second test kills only the broker under the running stack (`rlhf up` starts it again,
empty): the services' `kafka` health goes NOT_SERVING, then SERVING, and the same
exactly-once and learner checks hold for the log lost while running.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from rlhf.reward.data import FeedbackConverter
from rlhf.serving.client import check_health, sync_channel
from rlhf.v1 import events_pb2, learner_pb2, learner_pb2_grpc, reward_pb2, reward_pb2_grpc
from tests.e2e.test_loop import FAST, _cli, _last_json
from tests.procs import ROOT, stop_up, up_command, up_ports, wait_for, wait_for_line

pytestmark = pytest.mark.slow


def _layout(tmp_path: Path) -> tuple[Path, dict, dict, dict]:
    """State dir, ports, environment and addresses of one test's `rlhf up`."""
    state = tmp_path / "state"
    ports = up_ports()
    env = {**os.environ, **FAST, "RLHF_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    addr = {
        "gateway": f"http://127.0.0.1:{ports['http']}",
        "reward": f"127.0.0.1:{ports['base'] + 1}",
        "learner": f"127.0.0.1:{ports['base'] + 3}",
    }
    return state, ports, env, addr


def _up(env: dict, state: Path, ports: dict, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        up_command(state, ports, *extra, "--timeout", "400"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    wait_for_line(proc, "all services SERVING", 500, seen)
    return proc, seen


def _trainable_feedback(state: Path) -> tuple[int, int]:
    """(feedback events in the gateway's outbox, those that make a training example)."""
    with sqlite3.connect(state / "gateway" / "outbox.db") as db:
        payloads = [p for (p,) in db.execute("SELECT payload FROM outbox WHERE topic = 'rlhf.feedback'")]
    converter, trainable = FeedbackConverter(), 0
    for p in payloads:
        fb = events_pb2.Feedback()
        fb.ParseFromString(p)
        trainable += len(converter.convert(fb)[1])
    return len(payloads), trainable


def _simulate(env: dict, gateway: str, n: int) -> int:
    sim = _cli(
        env,
        "simulate",
        "--oracle",
        "prefers_concise",
        "--feedback",
        str(n),
        "--mode",
        "mixed",
        "--gateway",
        gateway,
        "--max-tokens",
        "12",
        "--concurrency",
        "2",
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    counts = _last_json(sim.stdout)
    assert counts["errors"] == 0, counts
    return counts["feedback_accepted"]


def _metric(url: str, sample: str) -> float:
    """One sample of a Prometheus text page, e.g. 'rlhf_outbox_resent_total{topic="rlhf.feedback"}'; 0 if absent."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", httpx.get(url, timeout=10).text, re.M)
    return float(match.group(1)) if match else 0.0


def _simulate_and_train(
    env: dict, gateway: str, n: int, state: Path, reward, learner, accepted: int, past_step: int
) -> tuple[int, int]:
    """n more simulated chats; then every accepted feedback event is trained exactly once (RM
    examples_seen = the trainable events in the outbox) and the learner steps past `past_step`.
    Returns (accepted, trainable)."""
    accepted += _simulate(env, gateway, n)
    stored, trainable = _trainable_feedback(state)
    assert stored == accepted
    # every accepted event trained once: not stuck at an earlier count, not double
    info = wait_for(
        lambda: (i := reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30)).examples_seen >= trainable and i,
        300,
        f"RM trained on all {trainable} examples",
        every=1,
    )
    assert info.examples_seen == trainable, (info.examples_seen, trainable)
    # and the learner trains on the new rollouts log
    wait_for(
        lambda: learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).step > past_step,
        400,
        f"a PPO step past step {past_step}",
        every=2,
    )
    assert reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30).examples_seen == trainable
    return accepted, trainable


def _log(state: Path, name: str) -> str:
    return (state / "logs" / f"{name}.log").read_text(errors="replace")


def test_a_restart_with_the_same_state_dir_trains_every_feedback_once(tmp_path):
    state, ports, env, addr = _layout(tmp_path)
    proc = None
    try:
        # 1. the first run: feedback trained, the learner steps (so both have checkpoints with offsets)
        proc, _ = _up(env, state, ports)
        accepted = _simulate(env, addr["gateway"], 12)
        with sync_channel(addr["reward"]) as rch, sync_channel(addr["learner"]) as lch:
            reward, learner = reward_pb2_grpc.RewardServiceStub(rch), learner_pb2_grpc.LearnerServiceStub(lch)
            stored, trainable = _trainable_feedback(state)
            assert stored == accepted
            wait_for(
                lambda: reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30).examples_seen == trainable,
                240,
                f"RM trained on the {trainable} examples before the kill",
                every=1,
            )
            wait_for(
                lambda: learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).step >= 1,
                400,
                "a PPO step before the kill",
                every=2,
            )

        # 2. SIGKILL: no clean stop anywhere; the children and the broker die with `rlhf up`
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=60)

        # 3. the same command, the same state dir: the broker comes back empty
        first_run = accepted
        proc, _ = _up(env, state, ports)
        with sync_channel(addr["reward"]) as rch, sync_channel(addr["learner"]) as lch:
            reward, learner = reward_pb2_grpc.RewardServiceStub(rch), learner_pb2_grpc.LearnerServiceStub(lch)
            restored_step = learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).step
            assert restored_step >= 1
            accepted, trainable = _simulate_and_train(
                env, addr["gateway"], 8, state, reward, learner, accepted, restored_step
            )
            # the outbox sent the first run's events again (the old log is gone), and the reward
            # service dropped those its restored checkpoint had trained on
            resent = _metric(f"{addr['gateway']}/metrics", 'rlhf_outbox_resent_total{topic="rlhf.feedback"}')
            duplicates = _metric(f"http://127.0.0.1:{ports['metrics'] + 1}/metrics", "rlhf_feedback_duplicates_total")
            print(
                f"accepted {accepted} (first run {first_run}), trainable {trainable}, re-sent {resent:g}, "
                f"dropped as duplicates {duplicates:g}, learner step {restored_step} -> past it"
            )
            assert resent >= first_run and duplicates <= resent

        # 4. visible: ERROR lines naming the lost topic, where it was found
        for name, topic in (("reward", "rlhf.feedback"), ("learner", "rlhf.rollouts"), ("gateway", "rlhf.feedback")):
            lines = [ln for ln in _log(state, name).splitlines() if "lost" in ln and topic in ln and "ERROR" in ln]
            assert lines, f"no lost-log ERROR line for {topic} in {name}.log"
            print(f"{name}: {lines[0][:300]}")
    except BaseException:
        _print_logs(state)
        raise
    finally:
        stop_up(proc)


def _print_logs(state: Path) -> None:
    for name in ("gateway", "reward", "learner", "rollout", "generator"):
        path = state / "logs" / f"{name}.log"
        if path.exists():
            print(f"--- {name}.log (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))


def test_a_broker_lost_under_the_running_stack(tmp_path):
    state, ports, env, addr = _layout(tmp_path)
    proc = None
    try:
        # the broker stays down ≥ 3 s, longer than one round of the 2 s watch (at the default 1 s
        # backoff an outage can fall between two rounds and never show)
        proc, _ = _up(env, state, ports, "--restart-backoff", "3")
        with sync_channel(addr["reward"]) as rch, sync_channel(addr["learner"]) as lch:
            reward, learner = reward_pb2_grpc.RewardServiceStub(rch), learner_pb2_grpc.LearnerServiceStub(lch)
            accepted = _simulate(env, addr["gateway"], 8)
            _, trainable = _trainable_feedback(state)
            wait_for(
                lambda: reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30).examples_seen == trainable,
                240,
                f"RM trained on the {trainable} examples",
                every=1,
            )
            step = wait_for(
                lambda: learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).step,
                400,
                "a PPO step before the broker dies",
                every=2,
            )

            (tansu,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tansu" in p.name()]
            tansu.kill()
            wait_for(lambda: check_health(addr["reward"], "kafka") == "NOT_SERVING", 10, "reward's kafka NOT_SERVING")
            wait_for(
                lambda: (
                    check_health(addr["reward"], "kafka") == "SERVING"
                    and check_health(addr["learner"], "kafka") == "SERVING"
                ),
                120,
                "kafka SERVING after the restart",
            )

            accepted, trainable = _simulate_and_train(env, addr["gateway"], 6, state, reward, learner, accepted, step)
        for name in ("reward", "learner", "gateway"):
            assert any("lost" in ln and "ERROR" in ln for ln in _log(state, name).splitlines()), name
        assert "Kafka broker unreachable" in _log(state, "reward")
    except BaseException:
        _print_logs(state)
        raise
    finally:
        stop_up(proc)
