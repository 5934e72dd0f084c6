"""OpenTelemetry traces: one trace per chat, from the gateway through the generator to the
feedback that rates it.

Off by default (`tracing=none`): no TracerProvider is installed, so every span is the API's
no-op span and nothing is exported. `tracing=console` writes each span, as it ends, as one
JSON line to `tracing_file` (or stdout); `tracing=otlp` batches spans to an OTLP/gRPC
collector at `otlp_endpoint` (Jaeger, Grafana Tempo, an OpenTelemetry Collector).

Spans are created by hand (the OpenTelemetry instrumentation packages for FastAPI and gRPC
are not a dependency): the gateway opens `chat.completions` and puts the W3C `traceparent`
of it into the Generate call's gRPC metadata (`outgoing_metadata`); the generator opens its
`generate` span as that span's child (`incoming_context`). A chat's completion id is made of
its trace and span ids (`request_id`), so every id the chat hands out (the response ids, the
generator's request id, the Interaction and Feedback events that name them) leads back to
its trace (`span_context_of`), and the feedback span links to the chat it rates.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

tracer = trace.get_tracer("rlhf")
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate, whatever OTEL_PROPAGATORS says
_IDS = re.compile(r"^[a-z]+-([0-9a-f]{32})-([0-9a-f]{16})(?:-\d+)?$")


def setup_tracing(service: str, settings: Any) -> bool:
    """Install this process's TracerProvider from `settings` (`tracing`, `otlp_endpoint`,
    `tracing_file`, declared in rlhf.serving.settings.CommonSettings); service.name is
    `rlhf-<service>`. Returns whether spans are exported."""
    mode = settings.tracing
    if mode == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    from rlhf import __version__

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"rlhf-{service}", "service.version": __version__})
    )
    if mode == "console":
        out = open(settings.tracing_file, "a", encoding="utf-8") if settings.tracing_file else None  # noqa: SIM115 - open for the process's life
        exporter = ConsoleSpanExporter(
            service_name=f"rlhf-{service}",
            formatter=lambda span: span.to_json(indent=None) + "\n",
            **({"out": out} if out is not None else {}),
        )
        # written as each span ends: the file is complete whenever it is read
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint or None  # None: OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:
        raise ValueError(f"tracing: {mode!r} is not one of none, console, otlp")
    trace.set_tracer_provider(provider)
    log.info(
        "tracing on",
        extra={"exporter": mode, "endpoint": settings.otlp_endpoint, "file": str(settings.tracing_file or "")},
    )
    return True


def shutdown_tracing() -> None:
    """Export what is still buffered (OTLP batches); a no-op when tracing is off."""
    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()


# --- HTTP routes ------------------------------------------------------------------------


def end_span(span: trace.Span, status: int | None, error: BaseException | None = None) -> None:
    """End a server span with its HTTP status. ERROR for a 5xx or an exception that is no
    HTTP answer; a 4xx is the caller's mistake, not the server's (OpenTelemetry's HTTP
    conventions)."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if status is None or status >= 500:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        elif status is not None:
            span.set_status(Status(StatusCode.ERROR))
    span.end()


def http_span(name: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Run a FastAPI route inside its own server span `name` (the current span there, so
    `trace.get_current_span()` finds it and outgoing calls carry it). A streaming response's
    span ends after its last byte went out."""

    def decorate(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(route)  # FastAPI reads the route's parameters through __wrapped__
        async def traced(*args: Any, **kwargs: Any) -> Any:
            span = tracer.start_span(name, kind=SpanKind.SERVER)
            try:
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    response = await route(*args, **kwargs)
            except Exception as e:
                end_span(span, getattr(e, "status_code", None), e)
                raise
            status = getattr(response, "status_code", 200)
            if hasattr(response, "body_iterator") and getattr(response, "background", None) is None:
                from starlette.background import BackgroundTask

                response.background = BackgroundTask(end_span, span, status)
            else:
                end_span(span, status)
            return response

        return traced

    return decorate


# --- across processes -------------------------------------------------------------------


def outgoing_metadata(span: trace.Span | None = None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata that makes the callee's spans children of `span` (default: the current
    span): `traceparent` (and `tracestate`). None when there is nothing to propagate."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx)
    return tuple(carrier.items()) or None


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | Mapping[str, str] | None) -> Context:
    """The trace context a caller sent in gRPC metadata (an empty context if none)."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    carrier = {k.lower(): v for k, v in items if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


# --- ids that lead back to a trace --------------------------------------------------------


def request_id(prefix: str, span: trace.Span) -> str:
    """`<prefix>-<trace id>-<span id>` for a recording span, else `<prefix>-<random hex>`
    (tracing off: the id is what it always was)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return f"{prefix}-{uuid.uuid4().hex}"
    return f"{prefix}-{trace.format_trace_id(ctx.trace_id)}-{trace.format_span_id(ctx.span_id)}"


def span_context_of(id_: str) -> SpanContext | None:
    """The span whose `request_id` `id_` is (or a response id made of it, `<id>-<index>`);
    None for an id made while tracing was off."""
    m = _IDS.match(id_)
    if m is None:
        return None
    return SpanContext(int(m[1], 16), int(m[2], 16), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def trace_id_of(id_: str) -> str:
    """The trace id (32 hex digits) an id leads to, "" if none."""
    ctx = span_context_of(id_)
    return trace.format_trace_id(ctx.trace_id) if ctx is not None else ""


def links_to(ids: Sequence[str], **attributes: Any) -> list[Link]:
    """Links to the spans that made `ids` (ids made while tracing was off are skipped)."""
    return [Link(ctx, attributes or None) for ctx in map(span_context_of, ids) if ctx is not None]
