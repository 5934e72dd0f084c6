"""`rlhf status`: what one `rlhf up` stack is doing, asked of the processes themselves.

The broker first (a Kafka metadata request to the bootstrap in up.json, short timeout), then
each service: its health, its `kafka` health (SERVING while its Kafka clients reach the
broker and its log is intact; a server that does not report that name answers NOT_FOUND,
shown as "-"), the restarts `rlhf up` counted, and the version it serves. A service that is
SERVING while its `kafka` is NOT_SERVING is `degraded`. Exit code 0 only when the broker and
every service are SERVING and none is degraded. Every probe runs at once, so a dead or hung
stack answers within a few seconds.
"""

from __future__ import annotations

import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from rlhf.launcher import ServiceSpec, default_specs, gateway_ready, read_endpoints, read_up
from rlhf.serving.client import check_health, sync_channel

TIMEOUT_S = 2.0  # per probe; they run in parallel


@dataclass
class Row:
    name: str
    address: str
    health: str  # SERVING / NOT_SERVING / UNREACHABLE / degraded / ...
    kafka: str = "-"  # the service's own view of Kafka; "-" where it does not report one
    restarts: str = "-"  # as counted by `rlhf up` (up.json)
    version: str = "-"

    @property
    def ok(self) -> bool:
        return self.health == "SERVING"


def broker_health(bootstrap: str, timeout: float = TIMEOUT_S) -> str:
    """SERVING when a Kafka client fetches metadata from `bootstrap` within `timeout`, else
    UNREACHABLE. A refused TCP connect answers at once; a hung broker takes the timeout."""
    from rlhf.bus.admin import wait_for_broker

    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        wait_for_broker(bootstrap, timeout_s=timeout)
    except Exception:  # noqa: BLE001 - a probe: whatever fails, the broker does not serve us
        return "UNREACHABLE"
    return "SERVING"


def kafka_health(spec: ServiceSpec, timeout: float = TIMEOUT_S) -> str:
    """The service's `kafka` health (gRPC health service name, or the gateway's /readyz
    "kafka" field); "-" where the service does not report one."""
    if spec.http:
        return str(gateway_ready(spec.url, timeout).get("kafka", "-"))
    status = check_health(spec.address, service="kafka", timeout=timeout)
    return "-" if status == "NOT_FOUND" else status


def service_version(spec: ServiceSpec, timeout: float = TIMEOUT_S) -> str:
    from rlhf.v1 import (
        generation_pb2,
        generation_pb2_grpc,
        learner_pb2,
        learner_pb2_grpc,
        reference_pb2,
        reference_pb2_grpc,
        reward_pb2,
        reward_pb2_grpc,
    )

    calls = {
        "generator": lambda ch: (
            "policy v"
            + str(
                generation_pb2_grpc.GenerationServiceStub(ch)
                .GetInfo(generation_pb2.GetInfoRequest(), timeout=timeout)
                .policy_version
            )
        ),
        "reward": lambda ch: (
            "rm v"
            + str(
                reward_pb2_grpc.RewardServiceStub(ch)
                .GetInfo(reward_pb2.RewardInfoRequest(), timeout=timeout)
                .rm_version
            )
        ),
        "reference": lambda ch: (
            reference_pb2_grpc.ReferenceServiceStub(ch)
            .GetInfo(reference_pb2.ReferenceInfoRequest(), timeout=timeout)
            .model
        ),
        "learner": lambda ch: (
            "policy v"
            + str(
                learner_pb2_grpc.LearnerServiceStub(ch)
                .GetStatus(learner_pb2.GetStatusRequest(), timeout=timeout)
                .policy_version
            )
        ),
    }
    if spec.name not in calls:
        return "-"
    with sync_channel(spec.address) as ch:
        try:
            return calls[spec.name](ch)
        except grpc.RpcError as e:
            return f"({e.code().name.lower()})"


def _service_row(spec: ServiceSpec, restarts: str) -> Row:
    from rlhf.launcher import health

    status = health(spec, timeout=TIMEOUT_S)
    row = Row(spec.name, spec.url, status, restarts=restarts)
    if status == "SERVING":
        row.kafka = kafka_health(spec)
        row.version = service_version(spec)
        if row.kafka == "NOT_SERVING":
            row.health = "degraded"
    return row


def _broker_row(bootstrap: str, up: dict | None) -> Row:
    broker = (up or {}).get("broker")
    restarts = str(broker["restarts"]) if broker else "-"
    kind = "embedded (Tansu, in memory)" if broker else "external" if up else "-"
    return Row("broker", bootstrap, broker_health(bootstrap), restarts=restarts, version=kind)


def collect(state_dir: Path) -> tuple[list[Row], list[str]]:
    """The broker's row, then one per service (every probe at once), and notes to print."""
    up = read_up(state_dir)
    specs = read_endpoints(state_dir) or default_specs()
    bootstrap = (up or {}).get("kafka_bootstrap") or os.environ.get("RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    restarts = {s["name"]: str(s.get("restarts", "-")) for s in (up or {}).get("services", [])}
    notes = []
    if up is None:
        notes.append(f"no up.json in {state_dir}: probing the default ports")
    elif not _alive(up.get("pid")):
        notes.append(f"up.json is stale: rlhf up (pid {up.get('pid')}) is not running")
    with ThreadPoolExecutor(max_workers=len(specs) + 1) as pool:
        broker = pool.submit(_broker_row, bootstrap, up)
        rows = [pool.submit(_service_row, s, restarts.get(s.name, "-")) for s in specs]
        return [broker.result(), *(r.result() for r in rows)], notes


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def render(rows: list[Row], notes: list[str]) -> list[str]:
    out = [f"{'service':<10} {'address':<24} {'health':<12} {'kafka':<12} {'restarts':<8} version"]
    out += [f"{r.name:<10} {r.address:<24} {r.health:<12} {r.kafka:<12} {r.restarts:<8} {r.version}" for r in rows]
    return out + notes


def run(state_dir: Path) -> int:
    """`rlhf status`: print the table, exit 0 only when everything is SERVING. A reader that
    hangs up early (`rlhf status | head -1`) ends the output, not the exit code."""
    rows, notes = collect(state_dir)
    try:
        for line in render(rows, notes):
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if all(r.ok for r in rows) else 1
