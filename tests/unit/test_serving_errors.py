"""One error convention: a handler raises a rlhf.errors kind, and the scaffold's server answers
with that kind's status code and the exception's message — for unary, server-streaming and
client-streaming RPCs, on a real gRPC server on loopback through `serve()`."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from rlhf.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, PermissionDenied, Unavailable
from rlhf.generation.types import InvalidRequest
from rlhf.serving import GrpcServiceSettings, Service, serve
from rlhf.serving.auth import control_metadata
from rlhf.serving.server import STATUS_CODES, status_code
from rlhf.v1 import generation_pb2, generation_pb2_grpc
from tests.procs import free_port

KINDS = {
    "invalid": (InvalidArgument("items: 300 items > limit 256 (RLHF_REWARD_MAX_ITEMS)"), "INVALID_ARGUMENT"),
    "request": (InvalidRequest("params.n", "must be between 1 and 8, got 9"), "INVALID_ARGUMENT"),
    "missing": (NotFound("version 42 is not in the weight store"), "NOT_FOUND"),
    "precondition": (FailedPrecondition("version 3 was never promoted"), "FAILED_PRECONDITION"),
    "denied": (PermissionDenied("version 9 was never published by the learner"), "PERMISSION_DENIED"),
    "loading": (Unavailable("the policy model is still loading"), "UNAVAILABLE"),
    "internal": (Internal("scoring failed; the reward service log has the cause"), "INTERNAL"),
}


class Raising(generation_pb2_grpc.GenerationServiceServicer):
    """Raises the kind named by the request (GetInfo: `self.kind`)."""

    kind = ""

    async def GetInfo(self, request, context):
        if self.kind == "bug":
            raise ValueError("a bug, not a refusal")
        raise KINDS[self.kind][0]

    async def GenerateStream(self, request, context):
        if request.request_id.startswith("late-"):
            yield generation_pb2.GenerateStreamResponse(request_id=request.request_id, text_delta="a")
        raise KINDS[request.request_id.removeprefix("late-")][0]

    async def UpdateWeights(self, request_iterator, context):
        async for chunk in request_iterator:
            raise KINDS[chunk.data.decode()][0]
        return generation_pb2.UpdateWeightsResponse()


class Svc(Service):
    name = "errors-test"
    grpc_services = ("rlhf.v1.GenerationService",)

    def __init__(self):
        self.servicer = Raising()

    def register(self, server):
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)


def test_every_kind_has_its_code_and_a_subclass_takes_its_ancestors():
    assert {k.__name__ for k in STATUS_CODES} == {
        "InvalidArgument",
        "NotFound",
        "FailedPrecondition",
        "PermissionDenied",
        "Unavailable",
        "Internal",
    }
    for error, code in KINDS.values():
        assert status_code(error).name == code


def test_the_server_answers_each_kind_with_its_code_and_message(tmp_path):
    async def scenario():
        port = free_port()
        settings = GrpcServiceSettings(
            port=port, metrics_port=0, drain_seconds=1, unready_seconds=0, state_dir=tmp_path, control_token="t0ken"
        )
        svc, stop = Svc(), asyncio.Event()
        task = asyncio.create_task(serve(svc, settings, stop_event=stop))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 10)
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            for name, (error, code) in KINDS.items():
                svc.servicer.kind = name
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=5)
                assert (e.value.code().name, e.value.details()) == (code, str(error)), name

                for rid in (name, f"late-{name}"):  # before and after the first message of a stream
                    got = []
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        async for msg in stub.GenerateStream(generation_pb2.GenerateRequest(request_id=rid), timeout=5):
                            got.append(msg.text_delta)
                    assert (e.value.code().name, e.value.details()) == (code, str(error)), rid
                    assert got == (["a"] if rid.startswith("late-") else [])

                with pytest.raises(grpc.aio.AioRpcError) as e:  # a client stream, past the token check
                    await stub.UpdateWeights(
                        iter([generation_pb2.WeightChunk(data=name.encode())]),
                        timeout=5,
                        metadata=control_metadata("t0ken"),
                    )
                assert (e.value.code().name, e.value.details()) == (code, str(error)), name

            svc.servicer.kind = "bug"  # anything else is not dressed up as a refusal
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetInfo(generation_pb2.GetInfoRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNKNOWN
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0

    before = (
        REGISTRY.get_sample_value("rlhf_grpc_server_handled_total", {"method": "GetInfo", "code": "NOT_FOUND"}) or 0
    )
    asyncio.run(scenario())
    after = REGISTRY.get_sample_value("rlhf_grpc_server_handled_total", {"method": "GetInfo", "code": "NOT_FOUND"})
    assert after == before + 1  # the request metrics see the mapped code


ROOT = Path(__file__).resolve().parents[2]


def _scan(path: Path) -> tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines calling .abort(), (line, module) imported, (line, name) of gRPC servicer classes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aborts = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "abort"
    ]
    imports = [(n.lineno, a.name) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imports += [(n.lineno, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    servicers = [
        (n.lineno, n.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef)
        and any(isinstance(b, ast.Attribute) and b.attr.endswith("ServiceServicer") for b in n.bases)
    ]
    return aborts, imports, servicers


def test_servicers_raise_and_live_in_the_library_without_importing_the_services():
    """No servicer answers with context.abort (only the scaffold's interceptors in rlhf/serving
    do); every gRPC servicer is defined in the library, none in services/; and no library
    module imports services.*: the services import their servicers, never the other way round."""
    bad = []
    for path in sorted((ROOT / "rlhf").rglob("*.py")) + sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT)
        aborts, imports, servicers = _scan(path)
        if rel.parts[:2] != ("rlhf", "serving"):
            bad += [f"{rel}:{line} calls .abort(): raise a rlhf.errors kind instead" for line in aborts]
        if rel.parts[0] == "rlhf":
            bad += [f"{rel}:{line} imports {name}" for line, name in imports if name.split(".")[0] == "services"]
        else:
            bad += [
                f"{rel}:{line} defines {name}: servicers live beside their library package" for line, name in servicers
            ]
    assert not bad, "\n".join(bad)
