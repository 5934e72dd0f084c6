"""`rlhf experiment win-rate --objective …` starts its own `rlhf up` (rlhf.experiments.live.
fresh_stack). A SIGTERM to the experiment must stop that stack too: before, Python died on
the signal without running the `finally` that stops it, and six services kept running.

The stack here is a stand-in for `rlhf up` (a shell script that says "all services SERVING"
and records the SIGTERM it gets), started through the same code path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.procs import ROOT, wait_for


def test_a_sigterm_to_the_experiment_stops_the_stack_it_started(tmp_path: Path):
    stopped = tmp_path / "stopped"
    fake_up = tmp_path / "fake-up"
    fake_up.write_text(
        textwrap.dedent(f"""\
            #!/usr/bin/env bash
            trap 'echo SIGTERM > {stopped}; exit 0' TERM
            echo "all services SERVING"
            while true; do sleep 0.1; done
            """)
    )
    fake_up.chmod(0o755)
    child = textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        from rlhf.experiments import live
        live.sys.executable = {str(fake_up)!r}  # the stack command: [sys.executable, "-m", "rlhf.cli", "up", ...]
        with live.fresh_stack(Path({str(tmp_path)!r}), "ppo", None, [], print):
            print("experiment running", flush=True)
            time.sleep(120)
        """)
    proc = subprocess.Popen(
        [sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert "starting a fresh stack" in proc.stdout.readline()
        assert proc.stdout.readline().strip() == "experiment running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        out = proc.stdout.read()
        assert "stack stopped (exit code 0)" in out, out
        wait_for(stopped.exists, 10, "the stand-in stack's SIGTERM")
        assert stopped.read_text().strip() == "SIGTERM"
        # nothing left running: the stand-in exited on its SIGTERM
        assert not _stand_ins(fake_up)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _stand_ins(fake_up):  # a failed run must not leave it behind either
            os.kill(pid, signal.SIGKILL)


def _stand_ins(script: Path) -> list[int]:
    return [p for p in _pids() if str(script) in " ".join(_cmdline(p))]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
