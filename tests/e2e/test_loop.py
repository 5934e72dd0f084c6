"""The whole loop in real processes, tiny models: `rlhf up --tiny` with fast settings, then

feedback (rlhf simulate through the gateway) → RM update (reward service) → rollouts
scored by the new RM → PPO step (learner) → drift gate → new version loaded by the
generator → a chat answer through the gateway reports the new version;
`rlhf eval` reports it too; LearnerService.Rollback brings an earlier version back and
the next chat answer reports that one. A second test: a drift budget nothing meets, every
trained version refused, the served version stays 0.
"""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from rlhf.bus import EventConsumer, Topics
from rlhf.serving.auth import control_token_from
from rlhf.serving.client import sync_channel
from rlhf.v1 import (
    events_pb2,
    generation_pb2,
    generation_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from tests.procs import ROOT, stop_up, up_command, up_ports, wait_for, wait_for_line

pytestmark = pytest.mark.slow

# Everything small and every cadence 1, so one feedback batch makes an RM version and one
# batch of rollouts makes a policy version. Passed through `rlhf up`'s environment.
FAST = {
    "RLHF_REWARD_TRAIN_BATCH_SIZE": "4",
    "RLHF_REWARD_PUBLISH_EVERY_STEPS": "1",
    "RLHF_LEARNER_BATCH_SIZE": "4",
    "RLHF_LEARNER_MINIBATCH_SIZE": "4",
    "RLHF_LEARNER_MICRO_BATCH_SIZE": "4",
    "RLHF_LEARNER_PPO_EPOCHS": "1",
    "RLHF_LEARNER_PUBLISH_EVERY": "1",
    "RLHF_LEARNER_DRIFT_KL_BUDGET": "1000",
    "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "8",
    "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
    "RLHF_LEARNER_TORCH_THREADS": "1",
    "RLHF_ROLLOUT_SAMPLES_PER_PROMPT": "2",
    "RLHF_ROLLOUT_MAX_TOKENS": "8",
    "RLHF_ROLLOUT_CONCURRENCY": "1",
    "RLHF_ROLLOUT_MIN_RM_EXAMPLES": "2",
    "RLHF_DEFAULT_MAX_TOKENS": "12",  # the generator's
    "RLHF_DEFAULT_MAX_COMPLETION_TOKENS": "12",  # the gateway's
    "RLHF_TORCH_THREADS": "1",
    "RLHF_REWARD_TORCH_THREADS": "1",
    "RLHF_REFERENCE_TORCH_THREADS": "1",
}


def _cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def stack(tmp_path, request):
    """`rlhf up --tiny` with FAST settings (and the test's overrides, via indirect params)."""
    ports = up_ports()
    state = tmp_path / "state"
    overrides = getattr(request, "param", {})
    env = {**os.environ, **FAST, **overrides, "RLHF_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        up_command(state, ports, "--timeout", "400"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        wait_for_line(proc, "all services SERVING", 500, seen)
        up = json.loads((state / "up.json").read_text())
        yield {
            "env": env,
            "state": state,
            "up": up,
            "urls": {
                s["name"]: (f"http://127.0.0.1:{s['port']}" if s["http"] else f"127.0.0.1:{s['port']}")
                for s in up["services"]
            },
            "logs": state / "logs",
        }
    finally:
        stop_up(proc)


def _print_logs(stack) -> None:
    """The services' last log lines, for a failure report."""
    for name in ("gateway", "reward", "learner", "rollout", "generator"):
        log = stack["logs"] / f"{name}.log"
        if log.exists():
            print(f"--- {name}.log (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))


def _chat_version(gateway: str) -> int:
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        timeout=120,
        json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["response_id"]
    assert r.headers["x-policy-version"] == str(body["policy_version"])
    return int(body["policy_version"])


def test_feedback_to_new_version_in_chat_then_rollback(stack, tmp_path):
    env, urls = stack["env"], stack["urls"]
    gateway = urls["gateway"]
    token = control_token_from(stack["state"])  # what `rlhf up` gave its children (Rollback, Pause need it)
    learner_ch, gen_ch = sync_channel(urls["learner"], control_token=token), sync_channel(urls["generator"])
    reward_ch = sync_channel(urls["reward"])
    learner = learner_pb2_grpc.LearnerServiceStub(learner_ch)
    generator = generation_pb2_grpc.GenerationServiceStub(gen_ch)
    reward = reward_pb2_grpc.RewardServiceStub(reward_ch)
    try:
        # 0. before any feedback: the reward model is version 0
        assert reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30).rm_version == 0

        # 1. simulated users give feedback through the real gateway
        sim = _cli(
            env,
            "simulate",
            "--oracle",
            "prefers_concise",
            "--feedback",
            "8",
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
        assert counts["feedback_accepted"] == 8 and counts["errors"] == 0
        assert "[simulate] 8/8 feedback" in sim.stdout  # progress lines

        # 2. the reward service trained on it and published a new RM version
        info = wait_for(
            lambda: (i := reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30)).rm_version >= 1 and i,
            180,
            "RM version after feedback",
            every=1,
        )
        assert info.train_step >= 1

        # 3. rollouts scored by the new RM reach the learner, PPO steps publish promoted versions
        def promoted():
            versions = learner.ListVersions(learner_pb2.ListVersionsRequest(), timeout=30).versions
            return [v for v in versions if v.promoted]

        good = wait_for(lambda: len(promoted()) >= 2 and promoted(), 400, "two promoted policy versions", every=2)
        # the step's version is in the store a moment before GetStatus counts the step
        status = wait_for(
            lambda: (st := learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30)).step >= 2 and st,
            60,
            "the learner's status counting the steps of those versions",
            every=1,
        )
        assert status.step >= 2 and status.rollouts_trained >= 8
        assert "kl" in status.last_stats and "score_mean" in status.last_stats
        with EventConsumer(
            stack["up"]["kafka_bootstrap"], Topics("rlhf").rollouts, events_pb2.Rollout, group_id="e2e-reader"
        ) as c:
            rollouts = wait_for(
                lambda: [r.event for r in c.poll(timeout_ms=2000)] or None, 60, "rollouts on Kafka", every=1
            )
            seen = list(rollouts)
            deadline = time.monotonic() + 120
            while not any(r.rm_version >= 1 and r.policy_version >= 1 for r in seen) and time.monotonic() < deadline:
                seen += [r.event for r in c.poll(timeout_ms=2000)]
        scored = [r for r in seen if r.rm_version >= 1 and r.policy_version >= 1]
        assert scored, "no rollout from a trained policy was scored by the trained RM"
        after = min(r.policy_version for r in scored)

        # 4. PPO steps after those rollouts made newer versions, the generator swapped one in,
        #    and a chat answer through the gateway reports it
        version = wait_for(
            lambda: (v := _chat_version(gateway)) > after and v,
            240,
            "a chat answer from a version trained after the RM update",
            every=2,
        )
        assert version in {v.version for v in promoted()}

        # 5. rlhf eval sees the served version (its last stdout line is one JSON object)
        ev = _cli(
            env,
            "eval",
            "--oracle",
            "prefers_concise",
            "--n",
            "2",
            "--samples",
            "2",
            "--max-tokens",
            "8",
            "--state-dir",
            str(stack["state"]),
            "--run-dir",
            str(tmp_path / "eval"),
        )
        print(sim.stdout[-1500:], ev.stdout[-3000:], sep="\n")  # what a user sees, in the CI log
        assert ev.returncode == 0, ev.stdout + ev.stderr
        record = _last_json(ev.stdout)
        assert record["policy_version"] >= 1 and record["n_prompts"] == 2
        assert 0.0 <= record["win_rate"] <= 1.0 and record["kl_to_reference"] == pytest.approx(
            record["kl_to_reference"]
        )
        assert (tmp_path / "eval" / "eval.jsonl").exists() and (tmp_path / "eval" / "eval.png").exists()

        # 6. Rollback (learner paused so no newer version races it): the served version follows
        learner.Pause(learner_pb2.PauseRequest(), timeout=30)
        target = good[0].version
        info = learner.Rollback(learner_pb2.RollbackRequest(version=target), timeout=120)
        assert info.version == target
        wait_for(
            lambda: generator.GetInfo(generation_pb2.GetInfoRequest(), timeout=30).policy_version == target,
            120,
            "generator serving the rolled-back version",
            every=1,
        )
        assert _chat_version(gateway) == target
        assert learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).serving_version == target
    except BaseException:
        _print_logs(stack)
        raise
    finally:
        for ch in (learner_ch, gen_ch, reward_ch):
            ch.close()


@pytest.mark.parametrize("stack", [{"RLHF_LEARNER_DRIFT_KL_BUDGET": "1e-7", "RLHF_LEARNER_LR": "1e-3"}], indirect=True)
def test_drift_gate_refuses_and_the_served_version_stays(stack):
    """A budget no trained version meets: the learner keeps training, every version is
    refused with its reason, and chat answers keep coming from the reference (v0)."""
    with sync_channel(stack["urls"]["learner"]) as ch:
        try:
            _drift_gate_checks(stack, learner_pb2_grpc.LearnerServiceStub(ch))
        except BaseException:
            _print_logs(stack)
            raise


def _drift_gate_checks(stack, learner) -> None:
    env, urls = stack["env"], stack["urls"]
    # the feedback comes from `rlhf experiment win-rate`: its simulated users, its eval rounds,
    # its verdict — not reached, since no trained version is ever served
    run = stack["state"].parent / "win-rate"
    exp = _cli(
        env,
        "experiment",
        "win-rate",
        "--oracle",
        "prefers_concise",
        "--feedback",
        "4",
        "--users",
        "2",
        "--max-tokens",
        "12",
        "--n",
        "2",
        "--samples",
        "1",
        "--every",
        "1",
        "--max-minutes",
        "0.3",
        "--state-dir",
        str(stack["state"]),
        "--run-dir",
        str(run),
    )
    assert exp.returncode == 3, exp.stdout + exp.stderr
    summary = _last_json(exp.stdout)
    assert summary["reached"] is False and summary["feedback_events"] == 4 and summary["policy_version"] == 0
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == summary["eval_rounds"] >= 2 and rows[0]["feedback"] == 0 and rows[-1]["feedback"] == 4
    assert [r["minutes"] for r in rows] == sorted(r["minutes"] for r in rows) and rows[-1]["minutes"] >= 0.3
    assert all(r["policy_version"] == 0 and r["n_prompts"] == 2 for r in rows)
    # each round after the baseline froze the loop (users held, learner paused), then thawed it
    assert (
        not rows[0]["frozen"]
        and all(r["frozen"] for r in rows[1:])
        and "stood still" in exp.stdout + (run / "report.md").read_text()
    )
    assert all(r["wall_minutes"] >= r["minutes"] for r in rows)
    assert not learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).paused
    assert (run / "eval.png").stat().st_size > 0 and "did not reach" in (run / "report.md").read_text()

    def refused():
        versions = learner.ListVersions(learner_pb2.ListVersionsRequest(), timeout=30).versions
        trained = [v for v in versions if v.version > 0]  # v0: the initial policy, promoted as is
        return len(trained) >= 2 and trained

    versions = wait_for(refused, 400, "two trained versions through the drift gate", every=2)
    assert all(not v.promoted for v in versions), [
        (v.version, v.promoted, v.kl_to_reference, v.reason) for v in versions
    ]
    assert all("exceeds budget" in v.reason and v.kl_to_reference > 1e-7 for v in versions)
    status = learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30)
    assert status.serving_version == 0 and status.step >= 2
    assert _chat_version(urls["gateway"]) == 0
