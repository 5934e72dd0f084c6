"""The operator commands without a stack: `rlhf config` shows what this environment gives
each setting and survives a reader that hangs up; `rlhf status --watch` reprints until
SIGINT and exits 0; `rlhf pause` with no learner or no token says so in one line, exit 1.
(Pause and resume against a real learner: tests/integration/test_cli_operator.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from rlhf.cli import main
from tests.procs import ROOT, free_port, wait_for


def rlhf(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def config_rows(text: str) -> dict[str, list[tuple[str, str]]]:
    """{RLHF_NAME: [(value, default) per service section it appears in]}"""
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in text.splitlines():
        if line.startswith("RLHF_"):
            name, value, default = line.split()[:3]
            rows.setdefault(name, []).append((value, default))
    return rows


def test_config_shows_the_environment_applied_beside_the_default(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_LEARNER_BATCH_SIZE", "32")
    monkeypatch.setenv("RLHF_CONTROL_TOKEN", "s3cret-token-value")
    monkeypatch.delenv("RLHF_LEARNER_PPO_EPOCHS", raising=False)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    rows = config_rows(out)
    assert rows["RLHF_LEARNER_BATCH_SIZE"] == [("32", "16")]
    assert rows["RLHF_LEARNER_PPO_EPOCHS"] == [("4", "4")]
    assert rows["RLHF_LEARNER_TRACKING"] == [("tensorboard", "tensorboard")]
    # the secret is masked, never printed
    assert "s3cret" not in out and rows["RLHF_CONTROL_TOKEN"] == [("**********", '""')]


def test_config_names_a_refused_value_and_exits_1(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_LEARNER_BATCH_SIZE", "many")
    assert main(["config"]) == 1
    captured = capsys.readouterr()
    assert "RLHF_LEARNER_BATCH_SIZE='many': Input should be a valid integer" in captured.err
    assert config_rows(captured.out)["RLHF_LEARNER_BATCH_SIZE"] == [("many", "16")]


def test_config_into_a_closed_pipe_exits_0_without_a_traceback():
    # the reader is gone before the first write: every write would raise BrokenPipeError
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "rlhf.cli", "config"],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, b"")
    # and the way people type it
    shell = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{sys.executable} -m rlhf.cli config | head -1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (shell.returncode, shell.stderr) == (0, "") and shell.stdout.startswith("# value:")


def nothing_listening_state_dir(tmp_path):
    """A state dir whose up.json points at ports nobody listens on: status probes stay here."""
    state = tmp_path / "state"
    state.mkdir()
    services = [
        {"name": n, "module": f"services.{n}", "port": free_port(), "metrics_port": free_port()}
        for n in ("generator", "learner")
    ]
    (state / "up.json").write_text(
        json.dumps({"kafka_bootstrap": f"127.0.0.1:{free_port()}", "pid": 0, "phase": "serving", "services": services})
    )
    return state, services


def test_status_watch_reprints_until_sigint_then_exits_0(tmp_path):
    state, _ = nothing_listening_state_dir(tmp_path)
    out = tmp_path / "watch.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.cli", "status", "--watch", "--interval", "0.2", "--state-dir", str(state)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: out.read_text().count("Ctrl-C stops") >= 2, 120, "two tables")
            assert proc.poll() is None  # still watching
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    tables = out.read_text().split("Ctrl-C stops")
    assert len(tables) >= 3 and all("learner" in t and "UNREACHABLE" in t for t in tables[1:])


def test_pause_without_a_learner_or_a_token_is_one_line_and_exit_1(tmp_path):
    state, services = nothing_listening_state_dir(tmp_path)
    learner = next(s for s in services if s["name"] == "learner")
    no_token = {"RLHF_CONTROL_TOKEN": ""}
    result = rlhf("pause", "--state-dir", str(state), env=no_token)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "rlhf pause: no control token" in result.stderr
    assert str(state / "control.token") in result.stderr

    (state / "control.token").write_text("a-token\n")
    result = rlhf("resume", "--state-dir", str(state), env=no_token)  # the address comes from up.json
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"rlhf resume: learner at 127.0.0.1:{learner['port']} unavailable")
