"""`rlhf up --tiny` brings the whole stack up (embedded broker + every service as real
processes), `rlhf status` reports the broker and all services SERVING (also into a pipe
closed early), and SIGTERM leaves no process behind."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.procs import ROOT, up_command, up_ports, wait_for_line

pytestmark = pytest.mark.slow


def test_up_status_and_clean_sigterm(tmp_path):
    ports = up_ports()
    env = {**os.environ, "RLHF_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        up_command(tmp_path / "state", ports, "--timeout", "300"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        wait_for_line(proc, "all services SERVING", 420, seen)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 7, [p.cmdline() for p in tree]  # broker + 6 services

        status = subprocess.run(
            [sys.executable, "-m", "rlhf.cli", "status", "--state-dir", str(tmp_path / "state")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("broker", "generator", "reward", "reference", "learner", "rollout", "gateway"):
            row = next(line.split() for line in status.stdout.splitlines() if line.startswith(name + " "))
            assert row[2] == "SERVING" and row[4] == "0", status.stdout  # health, restarts

        # a reader that hangs up early (head -1), or before reading at all (true): no
        # BrokenPipeError, and the exit code still says SERVING
        for reader in ("head -1", "true"):
            piped = subprocess.run(
                f"{sys.executable} -m rlhf.cli status --state-dir {tmp_path / 'state'} | {reader}; "
                "exit ${PIPESTATUS[0]}",
                shell=True,
                executable="/bin/bash",
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert piped.returncode == 0 and piped.stderr == "", (reader, piped.stdout + piped.stderr)
            assert piped.stdout.startswith("service") or reader == "true", piped.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, "".join(seen) + proc.stdout.read()
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
    # status now reports the stack down
    status = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "status", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1
