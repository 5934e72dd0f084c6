"""`rlhf up` supervises and fails fast, and `rlhf status` tells the truth (real processes).

One `rlhf up --tiny` stack serves the tests in file order: a second `rlhf up` on its ports
or its state dir is refused in one line and leaves it alone; a SIGKILLed service comes back
and answers; a SIGKILLed broker makes `rlhf status` fail and is restarted (last: it empties
the log). A service that always crashes stops its own stack in one line. Each fail-fast
exit prints how long it took (`-s` shows it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.procs import ROOT, stop_up, up_command, up_ports, wait_for, wait_for_line

pytestmark = pytest.mark.slow

SERVICES = ("generator", "reward", "reference", "learner", "rollout", "gateway")


def _ports() -> dict[str, int]:
    return up_ports()


_up_args = up_command


def _status(env, state) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "status", "--state-dir", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _row(status_out: str, name: str) -> list[str]:
    """`rlhf status`'s columns for one row: name, address, health, kafka, restarts, version…"""
    return next(line.split() for line in status_out.splitlines() if line.split()[:1] == [name])


def _timed(cmd, env, timeout=60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - t0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supervised")
    state, ports = tmp / "state", _ports()
    env = {**os.environ, "RLHF_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
    # a 3 s first backoff: long enough for `rlhf status` to see the broker down
    proc = subprocess.Popen(
        _up_args(state, ports, "--timeout", "400", "--restart-backoff", "3"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        wait_for_line(proc, "all services SERVING", 500, seen)
        yield {"proc": proc, "env": env, "state": state, "ports": ports, "seen": seen, "tmp": tmp}
    finally:
        stop_up(proc)


def _up_json(stack) -> dict:
    return json.loads((stack["state"] / "up.json").read_text())


def _untouched(stack, before: dict) -> None:
    after = _up_json(stack)
    assert after["pid"] == before["pid"] == stack["proc"].pid
    assert [s["port"] for s in after["services"]] == [s["port"] for s in before["services"]]
    status = _status(stack["env"], stack["state"])
    assert status.returncode == 0, status.stdout + status.stderr


def test_second_up_on_the_same_ports_fails_in_one_line(stack):
    before = _up_json(stack)
    other = stack["tmp"] / "other-state"
    done, took = _timed(_up_args(other, stack["ports"]), stack["env"])
    print(f"\nsecond rlhf up, same ports: exit {done.returncode} in {took:.2f}s: {done.stderr.strip()}")
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"port {stack['ports']['broker']} (broker)" in done.stderr  # the first port it would bind
    assert "Traceback" not in done.stdout + done.stderr
    assert not (other / "logs").exists()  # nothing started
    _untouched(stack, before)


def test_second_up_on_the_same_state_dir_names_the_holder(stack):
    before = _up_json(stack)
    done, took = _timed(_up_args(stack["state"], _ports()), stack["env"])
    print(f"\nsecond rlhf up, same state dir: exit {done.returncode} in {took:.2f}s: {done.stderr.strip()}")
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"pid {stack['proc'].pid}" in done.stderr
    _untouched(stack, before)


def test_killed_service_is_restarted_and_answers_again(stack):
    pid = next(s["pid"] for s in _up_json(stack)["services"] if s["name"] == "generator")
    os.kill(pid, signal.SIGKILL)
    wait_for_line(stack["proc"], "generator  exited with code -9", 30, stack["seen"])
    wait_for_line(stack["proc"], "generator  SERVING again (restart 1)", 300, stack["seen"])
    gateway = f"http://127.0.0.1:{stack['ports']['http']}"
    # the gateway reconnects to the new generator: a chat is answered again
    r = wait_for(
        lambda: (
            (
                resp := httpx.post(
                    f"{gateway}/v1/chat/completions",
                    timeout=60,
                    json={"messages": [{"role": "user", "content": "hello again"}], "max_tokens": 4},
                )
            ).status_code
            == 200
            and resp
        ),
        120,
        "a chat through the gateway after the generator restart",
        every=1,
        ignore=(httpx.HTTPError,),
    )
    assert r.json()["choices"][0]["message"]["content"] is not None
    status = wait_for(
        lambda: (st := _status(stack["env"], stack["state"])).returncode == 0 and st,
        60,
        "rlhf status exit 0 after the restart",
        every=1,
    )
    assert _row(status.stdout, "generator")[4] == "1", status.stdout  # restarts column
    assert _row(status.stdout, "reward")[4] == "0", status.stdout
    assert stack["proc"].poll() is None  # the stack kept running


def test_killed_broker_fails_status_and_is_restarted(stack):
    up = _up_json(stack)
    os.kill(up["broker"]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    failed = wait_for(
        lambda: (st := _status(stack["env"], stack["state"])).returncode != 0 and st,
        10,
        "rlhf status exit non-zero after the broker was killed",
        every=0.2,
    )
    print(f"\nbroker SIGKILL → rlhf status exit {failed.returncode} after {time.monotonic() - killed:.2f}s")
    assert _row(failed.stdout, "broker")[2] == "UNREACHABLE", failed.stdout
    wait_for_line(stack["proc"], "broker     restarted on", 60, stack["seen"])
    assert _up_json(stack)["broker"]["restarts"] == 1
    status = wait_for(
        lambda: (st := _status(stack["env"], stack["state"])) and _row(st.stdout, "broker")[2] == "SERVING" and st,
        30,
        "the broker SERVING again in rlhf status",
        every=1,
    )
    assert _row(status.stdout, "broker")[4] == "1", status.stdout
    assert stack["proc"].poll() is None


def test_model_path_that_does_not_exist_starts_nothing(tmp_path):
    env = {**os.environ, "RLHF_HOME": str(tmp_path / "home")}
    ports = _ports()
    cmd = [a for a in _up_args(tmp_path / "state", ports) if a != "--tiny"]
    done, took = _timed([*cmd, "--model", "/nonexistent"], env)
    print(f"\nrlhf up --model /nonexistent: exit {done.returncode} in {took:.2f}s: {done.stderr.strip()}")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "/nonexistent" in done.stderr
    assert "no such folder" in done.stderr
    assert not (tmp_path / "state").exists() and _port_free(ports["broker"])  # no broker, no child, no state

    half = tmp_path / "half-model"  # a config but no weights or tokenizer
    half.mkdir()
    (half / "config.json").write_text("{}")
    done, took = _timed([*cmd, "--model", str(half)], env)
    print(f"rlhf up --model <config only>: exit {done.returncode} in {took:.2f}s: {done.stderr.strip()}")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "no weights" in done.stderr and "no tokenizer" in done.stderr


def test_service_that_always_crashes_stops_the_stack_in_one_line(tmp_path):
    # an invalid rollout setting: the rollout worker exits at start, every time
    env = {**os.environ, "RLHF_HOME": str(tmp_path / "home"), "RLHF_ROLLOUT_TOP_P": "hot"}
    proc = subprocess.Popen(
        _up_args(tmp_path / "state", _ports(), "--max-restarts", "2", "--restart-backoff", "0.5", "--timeout", "400"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the broker and the services (the rollout worker may be between its runs)
        children = wait_for(
            lambda: len(kids := psutil.Process(proc.pid).children(recursive=True)) >= 6 and kids,
            300,
            "broker and services started",
        )
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out + err
    crash = [line for line in err.splitlines() if "crash loop" in line]
    print(f"\ncrash loop: exit {proc.returncode}: {err.strip()}")
    assert len(crash) == 1 and crash[0] == err.strip().splitlines()[-1], err
    assert "rollout crash loop: exited with code 1 after 2 restarts" in crash[0]
    assert "rollout_top_p" in crash[0] and "Traceback" not in err  # the reason, unescaped, not a traceback
    assert out.count("rollout    restarted") == 2, out
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
