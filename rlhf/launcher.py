"""`rlhf up`: the broker and every service as local processes, health-checked, supervised,
stopped cleanly.

Children run in their own sessions (a terminal's Ctrl-C reaches only us, and we stop them
in order) and die with us if we are killed (PR_SET_PDEATHSIG), so nothing is orphaned.

Supervision: nothing but `Stack.stop()` asks a child to exit, so any exit is a crash. The
child is started again after an exponential backoff (`RestartPolicy`: 1 s, 2 s, 4 s … per
restart still inside the window); `max_restarts` restarts inside `window_s` is a crash
loop, and `CrashLoop` carries the one line that says which process, its exit code and its
last log line. The embedded broker is watched the same way and comes back on the same port
— empty, since Tansu keeps topics in memory — and the topics are created again. The
backoff is hand-written rather than tenacity: tenacity retries one blocking call, while a
supervisor polls every child in one loop and must never block on one child's backoff.

What `rlhf up` checks before it starts anything is rlhf/preflight.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf._proc import detach_and_die_with_parent, last_log_line, listens_on
from rlhf.serving.client import check_health

if TYPE_CHECKING:
    from rlhf.broker import EmbeddedBroker

Progress = Callable[[str], None]


@dataclass
class ServiceSpec:
    name: str
    module: str  # python -m <module>
    port: int  # gRPC port, or HTTP port for the gateway
    metrics_port: int  # where Prometheus scrapes (the HTTP port for the gateway)
    http: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.http else self.address


def default_specs(
    host: str = "127.0.0.1", base_port: int = 50051, metrics_base: int = 9101, http_port: int = 8000
) -> list[ServiceSpec]:
    """Start order matters: the rollout worker and gateway need the model services."""
    names = ["generator", "reward", "reference", "learner", "rollout"]
    specs = [ServiceSpec(n, f"services.{n}", base_port + i, metrics_base + i) for i, n in enumerate(names)]
    specs.append(ServiceSpec("gateway", "services.gateway", http_port, http_port, http=True))
    addrs = {s.name: f"{host}:{s.port}" for s in specs if not s.http}
    for s in specs:
        s.env.update({"RLHF_HOST": host})
        if s.http:
            s.env["RLHF_HTTP_PORT"] = str(s.port)
        else:
            s.env.update({"RLHF_PORT": str(s.port), "RLHF_METRICS_PORT": str(s.metrics_port)})
        s.env.update({f"RLHF_{n.upper()}_ADDR": a for n, a in addrs.items() if n != s.name})
    return specs


def gateway_ready(url: str, timeout: float = 2.0) -> dict:
    """The gateway's GET {url}/readyz JSON ({"status": "SERVING" | "NOT_SERVING", "kafka": ...}),
    or {"status": "UNREACHABLE"} when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read() or b"{}") or {"status": f"HTTP {e.code}"}
        except ValueError:
            return {"status": f"HTTP {e.code}"}
    except (OSError, ValueError):
        return {"status": "UNREACHABLE"}


def http_ready(url: str, timeout: float = 2.0) -> str:
    """The gateway's readiness: "SERVING" / "NOT_SERVING" / "UNREACHABLE"."""
    return str(gateway_ready(url, timeout).get("status", "UNKNOWN"))


def health(spec: ServiceSpec, timeout: float = 2.0) -> str:
    return http_ready(spec.url, timeout) if spec.http else check_health(spec.address, timeout=timeout)


# ---------------------------------------------------------------------------- supervision


@dataclass
class RestartPolicy:
    """When a process that exited is started again, and when that is a crash loop."""

    max_restarts: int = 5  # restarts inside window_s; one more exit is a crash loop
    window_s: float = 300.0  # seconds over which restarts count
    backoff_s: float = 1.0  # delay before the first restart; doubles per recent restart
    max_backoff_s: float = 30.0  # cap of that delay


class CrashLoop(RuntimeError):
    """A supervised process exited more than `max_restarts` times within `window_s`; the
    message is the one line `rlhf up` prints."""


class Restarts:
    """One process's restart history under a RestartPolicy."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self.recent: deque[float] = deque()  # monotonic times of restarts inside the window
        self.total = 0

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before starting it again, or None: it is crash-looping."""
        while self.recent and now - self.recent[0] > self.policy.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.policy.max_restarts:
            return None
        return min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** len(self.recent))

    def count(self, now: float) -> None:
        self.recent.append(now)
        self.total += 1

    def crash_line(self, name: str, code: int | None, log: Path) -> str:
        text = log.read_text(errors="replace") if log.exists() else ""
        return (
            f"{name} crash loop: exited with code {code} after {len(self.recent)} restarts in "
            f"{self.policy.window_s:g}s; last log line: {last_log_line(text)} (log {log})"
        )


# A line the supervisor writes into a child's log before each restart, so a reader sees
# where one run ends; last_log_line skips it.
RESTART_MARK = "--- rlhf up: "


@dataclass
class _Child:
    spec: ServiceSpec
    restarts: Restarts
    proc: subprocess.Popen | None = None
    restart_at: float | None = None  # monotonic time of a scheduled restart; None while it runs
    last_exit: int | None = None
    serving: bool = False  # reported SERVING (by our own process) since its last start


class Stack:
    """The processes of one `rlhf up`: the services, and the embedded broker when given.

    `start()` the services, `wait_healthy()` until each is SERVING, then `watch()` until
    Ctrl-C; both restart what exits and raise `CrashLoop`. `on_change()` is called whenever
    a process exits or comes back (cli.py rewrites up.json from `snapshot()`)."""

    def __init__(
        self,
        specs: list[ServiceSpec],
        env: dict[str, str],
        log_dir: Path,
        drain_seconds: float = 5.0,
        policy: RestartPolicy | None = None,
        broker: EmbeddedBroker | None = None,
        topics: Iterable[str] = (),
        on_change: Callable[[], None] | None = None,
    ):
        self.specs = specs
        self.env = env
        self.log_dir = log_dir
        self.drain_seconds = drain_seconds
        self.policy = policy or RestartPolicy()
        self.children = {s.name: _Child(s, Restarts(self.policy)) for s in specs}
        self.broker = broker
        self.topics = list(topics)
        self.broker_restarts = Restarts(self.policy)
        self._broker_restart_at: float | None = None
        self.on_change = on_change or (lambda: None)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {n: c.proc for n, c in self.children.items() if c.proc is not None}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children.values():
            self._spawn(child)
        self.on_change()

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        env = {**os.environ, **self.env, **spec.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_dir / f"{spec.name}.log", "ab") as log:
            if child.restarts.total:
                log.write(
                    f"{RESTART_MARK}restart {child.restarts.total} after exit code {child.last_exit} ---\n".encode()
                )
                log.flush()
            child.proc = subprocess.Popen(
                [sys.executable, "-m", spec.module],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=detach_and_die_with_parent,
            )
        child.serving = False

    def supervise(self, progress: Progress = print) -> None:
        """One look at every process: schedule a restart for what exited, start what is due.
        Raises CrashLoop when one exits once too often."""
        now = time.monotonic()
        if self.broker is not None:
            self._watch_broker(now, progress)
        for name, c in self.children.items():
            if c.restart_at is None and c.proc is not None and c.proc.poll() is not None:
                c.last_exit, c.serving = c.proc.returncode, False
                delay = c.restarts.next_delay(now)
                if delay is None:
                    raise CrashLoop(c.restarts.crash_line(name, c.last_exit, self.log_dir / f"{name}.log"))
                c.restart_at = now + delay
                self.on_change()
                progress(f"  {name:<10} exited with code {c.last_exit}; restart {c.restarts.total + 1} in {delay:g}s")
            elif c.restart_at is not None and now >= c.restart_at:
                c.restarts.count(now)
                c.restart_at = None
                self._spawn(c)
                self.on_change()
                progress(f"  {name:<10} restarted (restart {c.restarts.total}, pid {c.proc.pid})")

    def _watch_broker(self, now: float, progress: Progress) -> None:
        from rlhf.broker import BrokerError
        from rlhf.bus.admin import BrokerUnavailable, ensure_topics

        b = self.broker
        if self._broker_restart_at is None:
            if b.alive:
                return
            code = b.exit_code
            delay = self.broker_restarts.next_delay(now)
            if delay is None:
                raise CrashLoop(self.broker_restarts.crash_line("broker", code, b.log_path))
            self._broker_restart_at = now + delay
            self.on_change()
            progress(
                f"  broker     exited with code {code}; restart {self.broker_restarts.total + 1} in {delay:g}s "
                f"on {b.bootstrap} (in memory: it comes back empty)"
            )
        elif now >= self._broker_restart_at:
            self.broker_restarts.count(now)
            self._broker_restart_at = None
            try:
                b.restart()
                ensure_topics(b.bootstrap, self.topics)
            except (BrokerError, BrokerUnavailable, OSError) as e:
                b.stop()  # not alive: the next look schedules another try, or calls it a crash loop
                progress(f"  broker     restart {self.broker_restarts.total} failed: {str(e).splitlines()[0]}")
                return
            self.on_change()  # up.json first: whoever reads the line finds it there
            progress(
                f"  broker     restarted on {b.bootstrap} (restart {self.broker_restarts.total}, "
                f"pid {b.pid}); topics created again"
            )

    def _status(self, c: _Child, timeout: float) -> str:
        """Health of our own child only: a child that is not running is never SERVING, and a
        SERVING answer counts only once the port is held by that child."""
        if c.proc is None or c.restart_at is not None or c.proc.poll() is not None:
            return "RESTARTING"
        status = health(c.spec, timeout=timeout)
        if status == "SERVING" and listens_on(c.proc.pid, c.spec.port) is False:
            return "NOT OURS"  # another process answers on our port
        return status

    def wait_healthy(self, timeout: float, progress: Progress = print) -> None:
        """Supervise until every service reports SERVING; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while True:
            self.supervise(progress)
            pending = [c for c in self.children.values() if not c.serving]
            if not pending:
                return
            for c in pending:
                status = self._status(c, timeout=1.0)
                if status != last.get(c.spec.name):
                    progress(f"  {c.spec.name:<10} {status}")
                    last[c.spec.name] = status
                c.serving = status == "SERVING"
            if time.monotonic() > deadline:
                names = ", ".join(c.spec.name for c in self.children.values() if not c.serving)
                raise TimeoutError(f"not SERVING after {timeout:.0f}s: {names}; logs in {self.log_dir}")
            time.sleep(0.5)

    def watch(self, progress: Progress = print, poll_s: float = 0.5) -> None:
        """Supervise until CrashLoop (or a signal); say when a restarted service is SERVING again."""
        while True:
            self.supervise(progress)
            for c in self.children.values():
                if c.restarts.total and not c.serving and self._status(c, timeout=1.0) == "SERVING":
                    c.serving = True
                    progress(f"  {c.spec.name:<10} SERVING again (restart {c.restarts.total})")
            time.sleep(poll_s)

    def snapshot(self) -> dict:
        """What up.json says about the processes: pid, restarts, last exit code, state."""

        def state(c: _Child) -> str:
            return "restarting" if c.restart_at is not None else "running"

        services = [
            asdict(c.spec)
            | {
                "pid": c.proc.pid if c.proc else None,
                "restarts": c.restarts.total,
                "last_exit": c.last_exit,
                "state": state(c),
            }
            for c in self.children.values()
        ]
        broker = None
        if self.broker is not None:
            broker = {
                "bootstrap": self.broker.bootstrap,
                "pid": self.broker.pid,
                "restarts": self.broker_restarts.total,
                "state": "restarting" if self._broker_restart_at is not None else "running",
            }
        return {"broker": broker, "services": services}

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM in reverse start order, wait for the drain, then SIGKILL what is left."""
        for spec in reversed(self.specs):
            proc = self.children[spec.name].proc
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---------------------------------------------------------------------------- up.json


def endpoints_file(state_dir: Path) -> Path:
    return state_dir / "up.json"


def write_endpoints(state_dir: Path, stack: Stack, kafka_bootstrap: str, phase: str) -> None:
    """up.json: where everything listens, and what the supervisor knows (`phase` is
    "starting" or "serving"). Atomic: a reader never sees half a file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"kafka_bootstrap": kafka_bootstrap, "pid": os.getpid(), "phase": phase, **stack.snapshot()}
    tmp = endpoints_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(endpoints_file(state_dir))


def read_up(state_dir: Path) -> dict | None:
    """up.json of a running `rlhf up`, or None."""
    try:
        return json.loads(endpoints_file(state_dir).read_text())
    except (FileNotFoundError, ValueError):
        return None


def read_endpoints(state_dir: Path) -> list[ServiceSpec] | None:
    up = read_up(state_dir)
    if up is None:
        return None
    names = {f.name for f in fields(ServiceSpec)}
    return [ServiceSpec(**{k: v for k, v in s.items() if k in names}) for s in up["services"]]
