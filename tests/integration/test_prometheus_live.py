"""A real Prometheus (Debian's package) scrapes a real `rlhf up --tiny` stack on loopback,
with the shipped scrape config (targets rewritten to the stack's ports) and alert rules.

- its HTTP API returns the loop's metrics from every service;
- the alert rules load and evaluate without error against live data;
- every metric name used by a Grafana panel or an alert rule is one the running services
  really export: read from each service's /metrics page (HELP/TYPE lines count, so a
  labelled metric nobody has touched yet still counts) and from what Prometheus ingested.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from rlhf.launcher import read_endpoints
from tests.integration.test_prometheus_promql import (
    PROMETHEUS_DIR,
    RULE_FILES,
    dashboard_queries,
    exported_names,
    missing_metrics,
    rule_queries,
)
from tests.procs import ROOT, free_port, stop_up, up_command, up_ports
from tests.procs import wait_for as _wait_for  # polled at this file's pace below

pytestmark = pytest.mark.slow

SERVICE_JOBS = ["generator", "reward", "reference", "learner", "rollout", "gateway"]

# every 0.5 s; an OSError means Prometheus or a target is not listening yet
wait_for = functools.partial(_wait_for, every=0.5, ignore=(OSError,))


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Up:
    """`rlhf up --tiny` as a child process, its output collected by a thread."""

    def __init__(self, state_dir: Path):
        ports = up_ports()
        self.state_dir = state_dir
        env = {**os.environ, "RLHF_HOME": str(state_dir.parent / "home"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            up_command(state_dir, ports, "--timeout", "420"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "all services SERVING" in line:
                self.ready.set()
        self.ready.set()  # exited: let the waiter look

    def wait_serving(self, timeout: float) -> None:
        self.ready.wait(timeout)
        assert self.proc.poll() is None and any("all services SERVING" in ln for ln in self.lines), "".join(self.lines)

    def stop(self) -> None:
        stop_up(self.proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("up") / "state")
    try:
        up.wait_serving(480)
        specs = {s.name: s for s in read_endpoints(up.state_dir)}
        yield specs
    finally:
        up.stop()


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    """The shipped deploy/prometheus/prometheus.yml, targets pointed at the stack, rules loaded."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus missing: run scripts/install-system-deps.sh (Debian package prometheus)"
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(stack) | {"prometheus"}, "the scrape config must cover exactly the services `rlhf up` runs"
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in RULE_FILES]
    for job in config["scrape_configs"]:
        spec = stack.get(job["job_name"])
        target = f"127.0.0.1:{spec.metrics_port if spec else port}"
        job["static_configs"] = [{"targets": [target]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and http_get(f"{url}/-/ready"), 60, "Prometheus ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print((tmp / "prometheus.log").read_text()[-4000:])


def api(prom: str, path: str, **params) -> dict:
    body = json.loads(http_get(f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"))
    assert body["status"] == "success", body
    return body["data"]


def query(prom: str, expr: str) -> list[dict]:
    return api(prom, "query", query=expr)["result"]


def up_by_job(prom: str) -> dict[str, str]:
    """`up` per scrape job, as Prometheus has it now: "1" scraped, "0" failed."""
    return {r["metric"]["job"]: r["value"][1] for r in query(prom, "up")}


def test_prometheus_scrapes_every_service(prometheus):
    def all_up():
        result = up_by_job(prometheus)
        return all(result.get(job) == "1" for job in SERVICE_JOBS) and result

    result = wait_for(all_up, 90, "every job up == 1")
    assert set(SERVICE_JOBS) <= set(result)


def test_prometheus_api_returns_the_loop_metrics(stack, prometheus):
    # some traffic: an HTTP request to the gateway and an RPC to the reward service
    http_get(f"{stack['gateway'].url}/healthz")
    with grpc.insecure_channel(stack["reward"].address) as channel:
        from rlhf.v1 import reward_pb2, reward_pb2_grpc

        try:
            reward_pb2_grpc.RewardServiceStub(channel).GetInfo(reward_pb2.RewardInfoRequest(), timeout=30)
        except grpc.RpcError:
            pass  # an error answer is counted too: the series exists either way

    ready = wait_for(
        lambda: len(query(prometheus, "rlhf_service_ready == 1")) >= 5 and query(prometheus, "rlhf_service_ready"),
        60,
        "rlhf_service_ready == 1 from the five gRPC services",
    )
    assert {r["metric"]["job"] for r in ready} == {"generator", "reward", "reference", "learner", "rollout"}
    info = query(prometheus, "rlhf_service_info")
    assert {r["metric"]["service"] for r in info} >= {"generator", "reward", "reference", "learner", "rollout"}

    rpc = wait_for(
        lambda: query(prometheus, 'rlhf_grpc_server_handled_total{job="reward", method="GetInfo"}'),
        30,
        "the GetInfo RPC counted by Prometheus",
    )
    assert rpc[0]["metric"]["code"]
    gateway = wait_for(
        lambda: query(prometheus, 'rlhf_gateway_requests_total{job="gateway", route="/healthz"}'),
        30,
        "the gateway request counted by Prometheus",
    )
    assert float(gateway[0]["value"][1]) >= 1
    latency = wait_for(
        lambda: query(
            prometheus, 'histogram_quantile(0.5, sum by (le) (rlhf_gateway_request_seconds_bucket{job="gateway"}))'
        ),
        30,
        "the gateway latency histogram",
    )
    assert float(latency[0]["value"][1]) >= 0
    assert query(prometheus, 'rlhf_outbox_backlog{job="gateway"}'), "the gateway's outbox gauge"


def test_alert_rules_load_and_evaluate_against_live_data(prometheus):
    names = {
        r.get("alert") or r.get("record")
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
    }

    def evaluated():
        rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
        # never evaluated: lastEvaluation is Go's zero time and health "unknown"
        done = [r for r in rules if not r.get("lastEvaluation", "0001").startswith("0001") and r["health"] != "unknown"]
        return len(done) == len(names) and rules

    rules = wait_for(evaluated, 60, "every rule evaluated once")
    assert {r["name"] for r in rules} == names
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert broken == {}
    # every service is up and SERVING: no availability alert may even be pending (one would
    # be, at once, if the rules and the scrape config disagreed on job or label names)
    availability = {
        r["alert"]
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        if g["name"] == "rlhf-availability"
        for r in g["rules"]
    }
    assert availability >= {"RlhfServiceDown", "RlhfServiceMissing", "RlhfServiceNotReady"}

    def raised() -> list[str]:
        return [a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"]]

    # An evaluation that ran before a target's first scrape leaves RlhfServiceMissing
    # pending until the next one finds the `up` series; a rule that disagrees with the
    # scrape config on a job or label name stays pending, and fails here.
    wait_for(
        lambda: availability.isdisjoint(raised()),
        30,
        "no availability alert pending",
        detail=lambda: f"raised {raised()}, up {up_by_job(prometheus)}",
    )


def test_dashboards_and_rules_query_only_exported_metrics(stack, prometheus):
    exported = set()
    for spec in stack.values():
        exported |= exported_names(http_get(f"http://127.0.0.1:{spec.metrics_port}/metrics").decode())
    # plus what Prometheus stores per target itself (up, scrape_duration_seconds, ...)
    jobs = "|".join(SERVICE_JOBS)
    exported |= set(api(prometheus, "label/__name__/values", **{"match[]": f'{{job=~"{jobs}"}}'}))
    assert "up" in exported and "rlhf_grpc_server_handled_total" in exported

    missing = missing_metrics({**dashboard_queries(), **rule_queries()}, exported)
    assert missing == {}, (
        "these panels/rules query metrics no running service exports (renamed? not implemented yet?):\n"
        + "\n".join(f"  {where}: {names}" for where, names in missing.items())
    )
