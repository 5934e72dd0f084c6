"""`rlhf up --tiny` brings the whole stack up (embedded broker + every service as real
processes), `rlhf status` reports all SERVING, and SIGTERM leaves no process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.procs import ROOT, free_port, wait_for_line

pytestmark = pytest.mark.slow


def test_up_status_and_clean_sigterm(tmp_path):
    base, metrics = free_port(), free_port()
    # five consecutive gRPC ports / metrics ports from a random base far from the defaults
    base = 20000 + base % 20000
    metrics = 41000 + metrics % 10000
    env = {**os.environ, "RLHF_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    args = ["--tiny", "--state-dir", str(tmp_path / "state"), "--broker-port", str(free_port()),
            "--http-port", str(free_port()), "--base-port", str(base), "--metrics-base-port", str(metrics),
            "--timeout", "300"]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "up", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        wait_for_line(proc, "all services SERVING", 420, seen)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 7, [p.cmdline() for p in tree]  # broker + 6 services

        status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--state-dir", str(tmp_path / "state")],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("generator", "reward", "reference", "learner", "rollout", "gateway"):
            assert name in status.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, "".join(seen) + proc.stdout.read()
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
    # status now reports the stack down
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--state-dir", str(tmp_path / "state")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
