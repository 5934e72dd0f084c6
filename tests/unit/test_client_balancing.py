"""gRPC clients spread calls over every backend with round_robin (a `dns:///` address, e.g. a
headless Service) and keep one backend with pick_first (a plain `host:port`): two real
servers on loopback, counted per server (rlhf/serving/client.py)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.serving.client import channel_options, load_balancing_for, sync_channel


class CountingHealth(health.HealthServicer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def Check(self, request, context):
        self.calls += 1
        return super().Check(request, context)


@pytest.fixture
def two_servers():
    servers, counters, ports = [], [], []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        counter = CountingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(counter, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
        counters.append(counter)
    yield ports, counters
    for server in servers:
        server.stop(0)


def calls_per_server(address: str, counters, load_balancing: str | None, n: int = 20) -> list[int]:
    with sync_channel(address, load_balancing=load_balancing) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(n):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
    return [c.calls for c in counters]


def test_round_robin_uses_every_backend_and_pick_first_one(two_servers):
    ports, counters = two_servers
    both = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)  # what DNS hands over for a headless Service
    spread = calls_per_server(both, counters, "round_robin")
    assert sum(spread) == 20 and min(spread) >= 5, spread  # every backend serves calls
    for c in counters:
        c.calls = 0
    one = calls_per_server(both, counters, "pick_first")
    assert sorted(one) == [0, 20], one


def test_the_address_picks_the_policy():
    assert load_balancing_for("dns:///generator-headless.rlhf.svc:50051") == "round_robin"
    assert load_balancing_for("generator:50051") == "pick_first"
    assert load_balancing_for("127.0.0.1:50051") == "pick_first"
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        channel_options(load_balancing="least_request")


def test_a_dns_address_reaches_the_server(two_servers):
    ports, counters = two_servers
    spread = calls_per_server(f"dns:///localhost:{ports[0]}", counters, None, n=3)
    assert spread == [3, 0]
