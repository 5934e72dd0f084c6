"""`rlhf pause` / `rlhf resume` against the real learner service (its entrypoint, the real
broker, the tiny model): the right token pauses and resumes it (GetStatus says so), a wrong
one is refused in one line with exit 1; the address and token come from a flag and the
environment, or from the state dir `rlhf up` writes (up.json, control.token)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf.serving.client import sync_channel
from rlhf.v1 import learner_pb2, learner_pb2_grpc
from tests.procs import ROOT, run_service

pytestmark = pytest.mark.slow  # a learner service with the tiny model: ~30 s on 2 cores

TOKEN = "cli-operator-test-token"


def rlhf(*args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RLHF_CONTROL_TOKEN"}
    if token is not None:
        env["RLHF_CONTROL_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


def test_pause_and_resume_the_real_learner(broker, topics, tiny_model_dir, tmp_path):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_LEARNER_BATCH_SIZE": "4",
        "RLHF_LEARNER_MINIBATCH_SIZE": "4",
        "RLHF_LEARNER_MICRO_BATCH_SIZE": "4",
        "RLHF_LEARNER_DRIFT_MAX_NEW_TOKENS": "4",
        "RLHF_LEARNER_DRIFT_SAMPLES_PER_PROMPT": "1",
        "RLHF_LEARNER_TORCH_THREADS": "1",
        "RLHF_CONTROL_TOKEN": TOKEN,
    }
    with run_service("learner", tmp_path, env=env, timeout=300) as svc, sync_channel(svc.address) as ch:
        learner = learner_pb2_grpc.LearnerServiceStub(ch)
        paused = lambda: learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).paused  # noqa: E731
        assert not paused()

        # 1. the right token, from the environment: paused, one line
        result = rlhf("pause", "--learner", svc.address, token=TOKEN)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert result.stdout == f"learner {svc.address}: paused at step 0, policy v0, serving v0, 0 rollouts trained\n"
        assert paused()

        # 2. a wrong token: refused by the learner, one line naming why, exit 1, still paused
        result = rlhf("resume", "--learner", svc.address, "--token", "guessed", token=TOKEN)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == (
            f"rlhf resume: refused by the learner at {svc.address}: "
            "Resume: the bearer token does not match the server's RLHF_CONTROL_TOKEN\n"
        )
        assert paused()

        # 3. no flags, no variable: the address from up.json, the token from control.token
        state = tmp_path / "up-state"
        state.mkdir()
        (state / "up.json").write_text(
            json.dumps(
                {
                    "kafka_bootstrap": broker.bootstrap,
                    "services": [
                        {"name": "learner", "module": "services.learner", "port": svc.port, "metrics_port": 0}
                    ],
                }
            )
        )
        (state / "control.token").write_text(TOKEN + "\n")
        result = rlhf("resume", "--state-dir", str(state), token=None)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert result.stdout.startswith(f"learner {svc.address}: training at step 0")
        assert not paused()
