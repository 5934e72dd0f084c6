"""rlhf/tracing.py: ids that lead back to a trace, W3C propagation through gRPC metadata,
the HTTP status of a span, off by default, and OTLP export to a real gRPC collector
stand-in (the OTLP TraceService from opentelemetry-proto, on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from rlhf import tracing
from rlhf.serving.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local():
    """A tracer of our own provider (the process-wide one stays the API's no-op default)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_a_request_id_leads_back_to_its_span(local):
    tracer, _ = local
    with tracer.start_as_current_span("chat") as span:
        rid = tracing.request_id("chatcmpl", span)
    ctx = span.get_span_context()
    assert rid == f"chatcmpl-{ctx.trace_id:032x}-{ctx.span_id:016x}"
    for id_ in (rid, f"{rid}-0", f"{rid}-13"):  # the completion and its response ids
        back = tracing.span_context_of(id_)
        assert (back.trace_id, back.span_id) == (ctx.trace_id, ctx.span_id)
        assert tracing.trace_id_of(id_) == f"{ctx.trace_id:032x}"
    (link,) = tracing.links_to([f"{rid}-1", "chatcmpl-nope-0"])
    assert link.context.trace_id == ctx.trace_id


def test_with_tracing_off_ids_are_random_and_lead_nowhere():
    span = trace.get_current_span()  # no provider installed: the invalid no-op span
    assert not span.get_span_context().is_valid
    a, b = tracing.request_id("chatcmpl", span), tracing.request_id("chatcmpl", span)
    assert a != b and len(a) == len("chatcmpl-") + 32
    assert tracing.span_context_of(f"{a}-0") is None and tracing.trace_id_of(a) == ""
    assert tracing.links_to([a]) == []
    assert tracing.outgoing_metadata() is None  # nothing added to a gRPC call


def test_traceparent_in_grpc_metadata_makes_the_callee_a_child(local):
    tracer, exporter = local
    with tracer.start_as_current_span("caller") as caller:
        metadata = tracing.outgoing_metadata()
    assert [k for k, _ in metadata] == ["traceparent"]
    # the callee sees metadata as gRPC gives it: (key, value) pairs, perhaps with binary ones
    ctx = tracing.incoming_context([("user-agent", "grpc"), *metadata, ("x-bin", b"\x00")])
    with tracer.start_span("callee", context=ctx):
        pass
    callee = next(s for s in exporter.get_finished_spans() if s.name == "callee")
    assert callee.context.trace_id == caller.get_span_context().trace_id
    assert callee.parent.span_id == caller.get_span_context().span_id
    # no metadata: a root span of its own
    with tracer.start_span("orphan", context=tracing.incoming_context(None)) as orphan:
        assert orphan.parent is None


@pytest.mark.parametrize(
    "status, error, expected",
    [(200, None, StatusCode.UNSET), (422, ValueError("n"), StatusCode.UNSET), (503, None, StatusCode.ERROR)]
    + [(None, RuntimeError("boom"), StatusCode.ERROR)],
)
def test_a_span_is_an_error_only_for_the_servers_failures(local, status, error, expected):
    tracer, exporter = local
    tracing.end_span(tracer.start_span("route"), status, error)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == expected
    assert span.attributes.get("http.response.status_code") == status
    assert bool(span.events) == (expected == StatusCode.ERROR and error is not None)  # the exception event


def test_tracing_is_off_by_default_and_a_bad_exporter_is_refused_by_name(monkeypatch):
    assert CommonSettings().tracing == "none"
    assert tracing.setup_tracing("test", CommonSettings()) is False
    monkeypatch.setenv("RLHF_TRACING", "jaeger")
    with pytest.raises(ValidationError, match="tracing"):
        CommonSettings()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_exports_to_the_configured_collector(tmp_path):
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        # a process of its own: a TracerProvider is installed once per process
        script = textwrap.dedent(
            f"""
            import json
            from rlhf import tracing
            from rlhf.serving.settings import CommonSettings
            settings = CommonSettings(tracing="otlp", otlp_endpoint="http://127.0.0.1:{port}")
            assert tracing.setup_tracing("probe", settings)
            with tracing.tracer.start_as_current_span("probe-span", attributes={{"k": 1}}) as span:
                rid = tracing.request_id("chatcmpl", span)
            tracing.shutdown_tracing()  # flushes the batch
            print(json.dumps({{"rid": rid}}))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        )
        rid = json.loads(out.stdout.strip().splitlines()[-1])["rid"]
    finally:
        server.stop(0)
    spans = [
        (rs, span)
        for req in collector.requests
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    (resource_spans, span), *_ = spans
    assert len(spans) == 1 and span.name == "probe-span"
    assert span.trace_id.hex() == tracing.trace_id_of(rid) and span.span_id.hex() == rid.rsplit("-", 1)[1]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "rlhf-probe"
