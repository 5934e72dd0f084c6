"""The one way to run a gRPC service: grpc.aio server, standard health and reflection,
Prometheus metrics, request metrics, graceful shutdown on SIGTERM.

A service implements `Service`; its `main()` is three lines:

    settings = load_settings(GeneratorSettings, argv)
    run_service(GeneratorService(settings), settings)

Health means ready: NOT_SERVING while `start()` loads weights and assigns consumers,
SERVING after, NOT_SERVING again from the first moment of draining.

Errors: a handler refuses a call by raising a `rlhf.errors.RequestError` (InvalidArgument,
NotFound, FailedPrecondition, PermissionDenied, Unavailable, Internal); the server answers
it with the status code `STATUS_CODES` gives that kind and the exception's message as the
details. No servicer calls `context.abort` itself.

The health service also answers for the name "kafka": SERVING while the process's Kafka
broker answers a Metadata request (every 2 s, rlhf.bus.watch) and every topic its clients
use exists, NOT_SERVING otherwise — a killed broker shows within a few seconds, and so
does a broker that came back empty until the topics are created again; gauge
rlhf_kafka_connected{service}. The service's own names stay SERVING meanwhile: what it
serves over gRPC still works, and its Kafka clients reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rlhf.bus.watch import KafkaWatch, kafka_watch
from rlhf.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    Unavailable,
)
from rlhf.serving.auth import control_interceptors
from rlhf.serving.logs import setup_logging
from rlhf.serving.settings import GrpcServiceSettings
from rlhf.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

RPC_SECONDS = Histogram(
    "rlhf_grpc_server_handling_seconds",
    "Time to handle an RPC, by method",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RPC_TOTAL = Counter("rlhf_grpc_server_handled_total", "RPCs handled, by method and status code", ["method", "code"])
SERVICE_UP = Gauge("rlhf_service_ready", "1 while the service reports SERVING", ["service"])
SERVICE_INFO = Gauge(
    "rlhf_service_info", "Constant 1, labelled with the service and package version", ["service", "version"]
)

KAFKA_HEALTH = "kafka"
"""The health-service name that reports the process's Kafka broker (see the module doc)."""


class Service(ABC):
    """What a gRPC service gives the scaffold. Algorithms live in `rlhf`, not here."""

    #: short name used in logs and metrics, e.g. "generator"
    name: str
    #: fully-qualified gRPC service names it registers, e.g. ("rlhf.v1.GenerationService",)
    grpc_services: tuple[str, ...]

    @abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add servicers to the server (called before it starts)."""

    async def start(self) -> None:
        """Load weights, connect to Kafka, start background tasks. Health turns SERVING after."""

    async def stop(self) -> None:
        """Release resources after in-flight RPCs have drained."""


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC. Streaming RPCs are timed until the handler returns."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler
        method = details.method.rsplit("/", 1)[-1]

        def record(start: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            code = context.code()
            if isinstance(error, asyncio.CancelledError):
                # grpc.aio cancels the handler when the client's deadline passes or it hangs up
                remaining = context.time_remaining()
                code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED
                )
            elif error is not None:
                code = code or grpc.StatusCode.UNKNOWN
            name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
            RPC_TOTAL.labels(method, name).inc()
            RPC_SECONDS.labels(method).observe(time.perf_counter() - start)

        def wrap_unary(fn: Callable) -> Callable:
            async def inner(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                start, err = time.perf_counter(), None
                try:
                    return await fn(request_or_iterator, context)
                except BaseException as e:  # noqa: BLE001 - re-raised
                    err = e
                    raise
                finally:
                    record(start, context, err)

            return inner

        def wrap_stream(fn: Callable) -> Callable:
            async def inner(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                start, err = time.perf_counter(), None
                try:
                    async for item in fn(request_or_iterator, context):
                        yield item
                except BaseException as e:  # noqa: BLE001 - re-raised
                    err = e
                    raise
                finally:
                    record(start, context, err)

            return inner

        return _wrapped(handler, wrap_unary, wrap_stream)


def _wrapped(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: `wrap_unary` for the RPCs that answer once,
    `wrap_stream` for those that answer with a stream."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
    return handler


# The one place a kind of refusal becomes a status code (rlhf/errors.py). A subclass takes
# its nearest listed ancestor's code.
STATUS_CODES: dict[type[RequestError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
}


def status_code(error: RequestError) -> grpc.StatusCode:
    """The status code that answers `error`: that of its nearest class in STATUS_CODES."""
    return next((STATUS_CODES[c] for c in type(error).__mro__ if c in STATUS_CODES), grpc.StatusCode.UNKNOWN)


class _RequestErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers a RequestError raised by a handler with its status code and message
    (`context.abort`); anything else passes untouched."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler

        def wrap_unary(fn: Callable) -> Callable:
            async def inner(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await fn(request_or_iterator, context)
                except RequestError as e:
                    await context.abort(status_code(e), str(e))

            return inner

        def wrap_stream(fn: Callable) -> Callable:
            async def inner(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for item in fn(request_or_iterator, context):
                        yield item
                except RequestError as e:
                    await context.abort(status_code(e), str(e))

            return inner

        return _wrapped(handler, wrap_unary, wrap_stream)


def grpc_options(settings: GrpcServiceSettings) -> list[tuple[str, Any]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]


async def follow_kafka(health: HealthServicer, watch: KafkaWatch, period_s: float = 0.5) -> None:
    """Keep health "kafka" equal to `watch.healthy` until cancelled."""
    last: bool | None = None
    down = False  # a problem was reported (the watch logs an unreachable broker itself)
    while True:
        ok = watch.healthy
        if ok != last:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set(KAFKA_HEALTH, status)
            if not ok and watch.connected:
                log.error(
                    "Kafka topics missing on the broker",
                    extra={"topics": watch.missing(), "bootstrap": watch.bootstrap},
                )
                down = True
            elif not ok:
                down = down or last is not None  # at start-up: not asked yet
            elif down:
                log.warning("Kafka healthy again", extra={"bootstrap": watch.bootstrap})
                down = False
            last = ok
        await asyncio.sleep(period_s)


async def serve(service: Service, settings: GrpcServiceSettings, stop_event: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or stop_event). Returns the process exit code."""
    from rlhf import __version__

    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    SERVICE_INFO.labels(service.name, __version__).set(1)
    SERVICE_UP.labels(service.name).set(0)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    server = grpc.aio.server(
        interceptors=[
            _MetricsInterceptor(),
            *control_interceptors(settings, service.grpc_services),
            _RequestErrorInterceptor(),
        ],
        options=grpc_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service.register(server)
    names = ("",) + tuple(service.grpc_services)
    for n in names + (KAFKA_HEALTH,):
        await health.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        tuple(service.grpc_services)
        + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        log.error("cannot bind %s (port in use?)", address)
        return 2
    await server.start()
    log.info("listening", extra={"address": f"{settings.host}:{port}", "metrics_port": settings.metrics_port})

    watch = kafka_watch(settings.kafka_bootstrap, service.name).start()
    kafka_task = asyncio.create_task(follow_kafka(health, watch))
    # Load weights etc. while health says NOT_SERVING; a stop request interrupts it.
    start_task = asyncio.create_task(service.start())
    stop_task = asyncio.create_task(stop_event.wait())
    await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if start_task.done():
        if start_task.exception() is not None:
            log.error("start-up failed", exc_info=start_task.exception())
            exit_code = 1
            stop_event.set()
        else:
            for n in names:
                await health.set(n, health_pb2.HealthCheckResponse.SERVING)
            SERVICE_UP.labels(service.name).set(1)
            log.info("serving", extra={"service": service.name})
    await stop_event.wait()

    # Drain: tell load balancers first (still accepting what they already routed to us),
    # then refuse new RPCs and let in-flight ones finish.
    log.info("draining", extra={"unready_seconds": settings.unready_seconds, "grace_seconds": settings.drain_seconds})
    SERVICE_UP.labels(service.name).set(0)
    kafka_task.cancel()
    await health.enter_graceful_shutdown()
    if not start_task.done():
        start_task.cancel()
    if exit_code == 0:
        await asyncio.sleep(settings.unready_seconds)
    await server.stop(settings.drain_seconds)
    try:
        await service.stop()
    except Exception:
        log.exception("error while stopping")
        exit_code = exit_code or 1
    watch.release()
    log.info("stopped")
    return exit_code


def run_service(service: Service, settings: GrpcServiceSettings) -> int:
    """Blocking entrypoint for a service's main()."""
    setup_logging(service.name, settings.log_level, settings.log_format)
    setup_tracing(service.name, settings)
    try:
        return asyncio.run(serve(service, settings))
    finally:
        shutdown_tracing()
