"""The gRPC scaffold itself, with a small in-process service: health follows readiness and
draining, deadlines cancel server work, in-flight RPCs finish during the drain, and RPCs
are counted in Prometheus."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from rlhf.serving import GrpcServiceSettings, Service, serve
from rlhf.v1 import generation_pb2, generation_pb2_grpc
from tests.procs import free_port


class SlowInfo(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self):
        self.cancelled = asyncio.Event()
        self.delay = 0.0

    async def GetInfo(self, request, context):
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return generation_pb2.GeneratorInfo(model="m", backend="test", policy_version=7)


class SlowStart(Service):
    name = "test"
    grpc_services = ("rlhf.v1.GenerationService",)

    def __init__(self):
        self.servicer = SlowInfo()
        self.release = asyncio.Event()
        self.stopped = False

    def register(self, server):
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)

    async def start(self):
        await self.release.wait()  # "loading weights"

    async def stop(self):
        self.stopped = True


async def _health(addr, service=""):
    async with grpc.aio.insecure_channel(addr) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def _wait_status(addr, want, service=""):
    for _ in range(100):
        try:
            if await _health(addr, service) == want:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {want}")


def test_health_deadline_drain_and_metrics():
    async def scenario():
        port = free_port()
        settings = GrpcServiceSettings(port=port, metrics_port=0, drain_seconds=3)
        svc, stop = SlowStart(), asyncio.Event()
        task = asyncio.create_task(serve(svc, settings, stop_event=stop))
        addr = f"127.0.0.1:{port}"

        # 1. NOT_SERVING while start() runs, for the server and the named service
        await _wait_status(addr, "NOT_SERVING")
        assert await _health(addr, "rlhf.v1.GenerationService") == "NOT_SERVING"
        svc.release.set()
        await _wait_status(addr, "SERVING", "rlhf.v1.GenerationService")

        async with grpc.aio.insecure_channel(addr) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            # 2. a deadline cancels the server-side work
            svc.servicer.delay = 5
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(svc.servicer.cancelled.wait(), 2)

            # 3. an RPC in flight when SIGTERM arrives still completes; health flips at once
            svc.servicer.delay = 1.0
            inflight = asyncio.ensure_future(stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=10))
            await asyncio.sleep(0.2)
            stop.set()
            await _wait_status(addr, "NOT_SERVING")
            assert (await inflight).policy_version == 7
        assert await asyncio.wait_for(task, 10) == 0
        assert svc.stopped

    asyncio.run(scenario())
    ok = REGISTRY.get_sample_value("rlhf_grpc_server_handled_total", {"method": "GetInfo", "code": "OK"})
    late = REGISTRY.get_sample_value(
        "rlhf_grpc_server_handled_total", {"method": "GetInfo", "code": "DEADLINE_EXCEEDED"}
    )
    assert (ok, late) == (1, 1)
