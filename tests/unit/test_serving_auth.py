"""The control-plane token (rlhf/serving/auth.py) on a real gRPC server on loopback, through
the scaffold's own `serve()`: the seven control RPCs need `authorization: Bearer <token>`,
a server without a token refuses them too, read-only RPCs stay open, a refused stream is
not read, and the token reaches neither a log line nor a metric label."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from prometheus_client import REGISTRY

from rlhf.serving import GrpcServiceSettings, Service, serve
from rlhf.serving.auth import CONTROL_METHODS, control_metadata, control_token_from
from rlhf.serving.client import aio_channel, sync_channel
from rlhf.v1 import generation_pb2, generation_pb2_grpc, learner_pb2, learner_pb2_grpc
from tests.procs import free_port

TOKEN = "s3cret-token-for-the-test"


class Gen(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self):
        self.chunks_read = 0

    async def GetInfo(self, request, context):
        return generation_pb2.GeneratorInfo(policy_version=3)

    async def LoadVersion(self, request, context):
        return generation_pb2.UpdateWeightsResponse(version=request.version)

    async def UpdateWeights(self, request_iterator, context):
        async for _ in request_iterator:
            self.chunks_read += 1
        return generation_pb2.UpdateWeightsResponse(version=5)


class Learn(learner_pb2_grpc.LearnerServiceServicer):
    async def GetStatus(self, request, context):
        return learner_pb2.LearnerStatus(step=1)

    async def Pause(self, request, context):
        return learner_pb2.LearnerStatus(paused=True)

    async def Resume(self, request, context):
        return learner_pb2.LearnerStatus(paused=False)

    async def Rollback(self, request, context):
        return learner_pb2.PolicyVersionInfo(version=request.version)

    async def Promote(self, request, context):
        return learner_pb2.CanaryStatus(stable_version=request.version)

    async def SetCanary(self, request, context):
        return learner_pb2.CanaryStatus(share=request.share)


class Both(Service):
    name = "auth-test"
    grpc_services = ("rlhf.v1.GenerationService", "rlhf.v1.LearnerService")

    def __init__(self):
        self.gen = Gen()

    def register(self, server):
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.gen, server)
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(Learn(), server)


def chunks(n: int = 3):
    yield generation_pb2.WeightChunk(header=generation_pb2.WeightHeader(version=5, total_bytes=n))
    for _ in range(n):
        yield generation_pb2.WeightChunk(data=b"x")


def control_calls(channel) -> dict:
    """The seven guarded RPCs, each a function of call kwargs (metadata=...)."""
    gen, learner = generation_pb2_grpc.GenerationServiceStub(channel), learner_pb2_grpc.LearnerServiceStub(channel)
    return {
        "UpdateWeights": lambda **kw: gen.UpdateWeights(chunks(), timeout=10, **kw),
        "LoadVersion": lambda **kw: gen.LoadVersion(generation_pb2.LoadVersionRequest(version=2), timeout=10, **kw),
        "Pause": lambda **kw: learner.Pause(learner_pb2.PauseRequest(), timeout=10, **kw),
        "Resume": lambda **kw: learner.Resume(learner_pb2.ResumeRequest(), timeout=10, **kw),
        "Rollback": lambda **kw: learner.Rollback(learner_pb2.RollbackRequest(version=1), timeout=10, **kw),
        "Promote": lambda **kw: learner.Promote(learner_pb2.PromoteRequest(version=1), timeout=10, **kw),
        "SetCanary": lambda **kw: learner.SetCanary(
            learner_pb2.SetCanaryRequest(set_share=True, share=0.2), timeout=10, **kw
        ),
    }


def refused(call, **kw) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(**kw)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    return e.value.details()


async def with_server(settings: GrpcServiceSettings, body):
    svc, stop = Both(), asyncio.Event()
    task = asyncio.create_task(serve(svc, settings, stop_event=stop))
    addr = f"127.0.0.1:{settings.port}"
    try:
        for _ in range(200):  # serving once GetInfo answers
            try:
                async with grpc.aio.insecure_channel(addr) as ch:
                    await generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(
                        generation_pb2.GetInfoRequest(), timeout=1
                    )
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        return await asyncio.to_thread(body, addr, svc)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def settings_for(tmp_path, token: str) -> GrpcServiceSettings:
    return GrpcServiceSettings(
        port=free_port(), metrics_port=0, drain_seconds=0.5, unready_seconds=0, state_dir=tmp_path, control_token=token
    )


def test_control_rpcs_need_the_token_and_read_only_ones_stay_open(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("RLHF_CONTROL_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    before = (
        REGISTRY.get_sample_value("rlhf_control_rpcs_refused_total", {"method": "UpdateWeights", "reason": "missing"})
        or 0.0
    )

    def body(addr, svc):
        with grpc.insecure_channel(addr) as ch:
            calls = control_calls(ch)  # RewardService ReleaseRater: tests/integration/test_reward_release.py
            assert {
                f"/rlhf.v1.{'GenerationService' if n in ('UpdateWeights', 'LoadVersion') else 'LearnerService'}/{n}"
                for n in calls
            } == {m for m in CONTROL_METHODS if not m.startswith("/rlhf.v1.RewardService/")}
            for name, call in calls.items():
                assert "authorization: Bearer <token>" in refused(call), name
                assert "does not match" in refused(call, metadata=control_metadata("wrong")), name
                assert "Bearer <token>" in refused(call, metadata=(("authorization", TOKEN),)), name  # no scheme
                call(metadata=control_metadata(TOKEN))  # the right token: answered as before
            assert svc.gen.chunks_read == 4, "only the authenticated stream (header + 3 chunks) was read"
            # read-only RPCs need nothing
            assert (
                generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(generation_pb2.GetInfoRequest()).policy_version
                == 3
            )
            assert learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(learner_pb2.GetStatusRequest()).step == 1
        # a channel built with the token sends it on every call
        with sync_channel(addr, control_token=TOKEN) as ch:
            for call in control_calls(ch).values():
                call()

        async def aio_calls():
            async with aio_channel(addr, control_token=TOKEN) as ch:
                assert (
                    await generation_pb2_grpc.GenerationServiceStub(ch).LoadVersion(
                        generation_pb2.LoadVersionRequest(version=4), timeout=10
                    )
                ).version == 4
                assert (
                    await learner_pb2_grpc.LearnerServiceStub(ch).Pause(learner_pb2.PauseRequest(), timeout=10)
                ).paused

        asyncio.run(aio_calls())

    asyncio.run(with_server(settings_for(tmp_path, TOKEN), body))
    assert (
        REGISTRY.get_sample_value("rlhf_control_rpcs_refused_total", {"method": "UpdateWeights", "reason": "missing"})
        == before + 2
    )  # none, no scheme
    assert (
        REGISTRY.get_sample_value("rlhf_grpc_server_handled_total", {"method": "Rollback", "code": "UNAUTHENTICATED"})
        >= 3
    )
    assert "control RPC refused" in caplog.text
    assert TOKEN not in caplog.text


def test_a_server_without_a_token_refuses_every_control_rpc(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_CONTROL_TOKEN", raising=False)

    def body(addr, svc):
        with grpc.insecure_channel(addr) as ch:
            for name, call in control_calls(ch).items():
                for kw in ({}, {"metadata": control_metadata(TOKEN)}, {"metadata": control_metadata("")}):
                    details = refused(call, **kw)
                    assert "no control token" in details and "RLHF_CONTROL_TOKEN" in details, (name, details)
            assert svc.gen.chunks_read == 0
            assert (
                generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(generation_pb2.GetInfoRequest()).policy_version
                == 3
            )

    asyncio.run(with_server(settings_for(tmp_path, ""), body))


def test_the_token_comes_from_the_environment_then_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_CONTROL_TOKEN", raising=False)
    assert control_token_from(tmp_path) == "" and control_token_from(None) == ""
    (tmp_path / "control.token").write_text(TOKEN + "\n")
    assert control_token_from(tmp_path) == TOKEN
    monkeypatch.setenv("RLHF_CONTROL_TOKEN", "from-env")
    assert control_token_from(tmp_path) == "from-env"
    # a server given no token in its settings reads the state dir's file
    monkeypatch.delenv("RLHF_CONTROL_TOKEN")

    def body(addr, svc):
        with grpc.insecure_channel(addr) as ch:
            control_calls(ch)["Pause"](metadata=control_metadata(TOKEN))
            assert "does not match" in refused(control_calls(ch)["Pause"], metadata=control_metadata("from-env"))

    asyncio.run(with_server(settings_for(tmp_path, ""), body))
