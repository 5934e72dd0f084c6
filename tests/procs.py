"""Start a service from its real entrypoint (`python -m services.<name>`) for a test.

gRPC services are ready when the standard health check says SERVING; the gateway (HTTP)
when GET /readyz does."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf.serving.client import check_health

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def up_ports(span: int = 8) -> dict[str, int]:
    """Ports for one `rlhf up`: broker, http, and `span` consecutive gRPC and metrics ports,
    all free now and all below Linux's ephemeral range (32768+). A port the kernel hands out
    as the local end of an outgoing connection (Kafka clients, gRPC channels) can be taken
    by one before a restarted service binds it again — a learner then crash-loops on
    "Failed to bind" — so none of these comes from that range."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(10000, 32768 - 2 * span - 2)
        ports = list(range(start, start + 2 * span + 2))
        if all(_bindable(p) for p in ports):
            return {"base": start, "metrics": start + span, "broker": start + 2 * span, "http": start + 2 * span + 1}
    raise RuntimeError("no free block of ports below 32768")


def up_command(state_dir, ports: dict[str, int], *extra: str) -> list[str]:
    """argv of `rlhf up --tiny` on `state_dir` with the ports of up_ports(); `extra` flags last."""
    return [
        sys.executable,
        "-m",
        "rlhf.cli",
        "up",
        "--tiny",
        "--state-dir",
        str(state_dir),
        "--broker-port",
        str(ports["broker"]),
        "--http-port",
        str(ports["http"]),
        "--base-port",
        str(ports["base"]),
        "--metrics-base-port",
        str(ports["metrics"]),
        *extra,
    ]


class ServiceProcess:
    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, port: int, metrics_port: int, http_port: int = 0
    ):
        self.name, self.env, self.log_path = name, env, log_path
        self.port, self.metrics_port, self.http_port = port, metrics_port, http_port
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of an HTTP service (the gateway)."""
        return f"http://127.0.0.1:{self.http_port}"

    def status(self) -> str:
        if not self.http_port:
            return check_health(self.address, timeout=1)
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                return "SERVING" if r.status == 200 else f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except OSError:
            return "UNREACHABLE"

    def command(self) -> list[str]:
        """argv of the service: its real entrypoint (a subclass may wrap it, e.g. torchrun)."""
        return [sys.executable, "-m", f"services.{self.name}"]

    def start(self) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if self.status() == "SERVING":
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not SERVING after {timeout}s:\n{self.log()}")

    def log(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


@contextmanager
def run_service(
    name: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[ServiceProcess]:
    """A service on free loopback ports with its state in tmp_path; stopped (SIGTERM) after."""
    port, metrics_port = free_port(), free_port()
    http_port = free_port() if name == "gateway" else 0
    full_env = {
        **os.environ,
        "RLHF_HOST": "127.0.0.1",
        "RLHF_PORT": str(port),
        "RLHF_METRICS_PORT": str(metrics_port),
        "RLHF_STATE_DIR": str(tmp_path / f"state-{name}"),
        "RLHF_DRAIN_SECONDS": "1",
        "RLHF_UNREADY_SECONDS": "0.2",
        "RLHF_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
        **({"RLHF_HTTP_PORT": str(http_port)} if http_port else {}),
        **(env or {}),
    }
    svc = ServiceProcess(name, full_env, tmp_path / f"{name}.log", port, metrics_port, http_port).start()
    try:
        svc.wait_serving(timeout)
        yield svc
    finally:
        svc.stop()


def stop_up(proc: subprocess.Popen | None, timeout: float = 90) -> None:
    """Stop an `rlhf up` process as Ctrl-C would (SIGTERM: it drains and stops its children);
    SIGKILL if it has not exited after `timeout` seconds (its children die with it)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float, seen: list[str]) -> None:
    """Read proc's text stdout until a line contains needle; every line read goes to seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not seen in {timeout}s:\n{''.join(seen)}")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.2,
    ignore: tuple[type[BaseException], ...] = (),
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll predicate() until it returns something truthy and return that; after `timeout`
    seconds fail naming `what`, the last value (or ignored exception) and detail(), e.g. a
    service's log."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ignore as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{what}: not within {timeout:.0f}s (last: {last!r})" + (f"\n{detail()}" if detail else "")
            )
        time.sleep(every)
