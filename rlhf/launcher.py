"""`rlhf up`: the broker and every service as local processes, health-checked, stopped cleanly.

Children run in their own sessions (a terminal's Ctrl-C reaches only us, and we stop them
in order) and die with us if we are killed (PR_SET_PDEATHSIG), so nothing is orphaned.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf._proc import detach_and_die_with_parent
from rlhf.serving.client import check_health


@dataclass
class ServiceSpec:
    name: str
    module: str          # python -m <module>
    port: int            # gRPC port, or HTTP port for the gateway
    metrics_port: int    # where Prometheus scrapes (the HTTP port for the gateway)
    http: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.http else self.address


def default_specs(host: str = "127.0.0.1", base_port: int = 50051, metrics_base: int = 9101, http_port: int = 8000) -> list[ServiceSpec]:
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


def http_ready(url: str, timeout: float = 2.0) -> str:
    """The gateway's readiness: GET {url}/readyz → "SERVING" / "NOT_SERVING" / "UNREACHABLE"."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout) as r:
            return json.loads(r.read()).get("status", "UNKNOWN")
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read() or b"{}").get("status", f"HTTP {e.code}")
        except ValueError:
            return f"HTTP {e.code}"
    except OSError:
        return "UNREACHABLE"


def health(spec: ServiceSpec, timeout: float = 2.0) -> str:
    return http_ready(spec.url, timeout) if spec.http else check_health(spec.address, timeout=timeout)


class Stack:
    """The processes of one `rlhf up`."""

    def __init__(self, specs: list[ServiceSpec], env: dict[str, str], log_dir: Path, drain_seconds: float = 5.0):
        self.specs = specs
        self.env = env
        self.log_dir = log_dir
        self.drain_seconds = drain_seconds
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            env = {**os.environ, **self.env, **spec.env, "PYTHONUNBUFFERED": "1"}
            log = open(self.log_dir / f"{spec.name}.log", "ab")
            self.procs[spec.name] = subprocess.Popen(
                [sys.executable, "-m", spec.module], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=detach_and_die_with_parent,
            )
            log.close()

    def wait_healthy(self, timeout: float, progress=print) -> None:
        deadline = time.monotonic() + timeout
        pending = [s for s in self.specs]
        last = {}
        while pending:
            for spec in list(pending):
                proc = self.procs[spec.name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with code {proc.returncode}; see {self.log_dir / (spec.name + '.log')}:\n{self.log_tail(spec.name)}")
                status = health(spec, timeout=1.0)
                if status != last.get(spec.name):
                    progress(f"  {spec.name:<10} {status}")
                    last[spec.name] = status
                if status == "SERVING":
                    pending.remove(spec)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not SERVING after {timeout:.0f}s: {names}; logs in {self.log_dir}")
            time.sleep(0.5)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        """SIGTERM in reverse start order, wait for the drain, then SIGKILL what is left."""
        for spec in reversed(self.specs):
            proc = self.procs.get(spec.name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds + 10
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def endpoints_file(state_dir: Path) -> Path:
    return state_dir / "up.json"


def write_endpoints(state_dir: Path, specs: list[ServiceSpec], kafka_bootstrap: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"kafka_bootstrap": kafka_bootstrap, "pid": os.getpid(), "services": [asdict(s) for s in specs]}
    tmp = endpoints_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(endpoints_file(state_dir))


def read_endpoints(state_dir: Path) -> list[ServiceSpec] | None:
    path = endpoints_file(state_dir)
    if not path.exists():
        return None
    return [ServiceSpec(**s) for s in json.loads(path.read_text())["services"]]
