"""Chat gateway: OpenAI-compatible HTTP API and web chat; feedback into a durable outbox.

    python -m services.gateway --http-port 8000 --generator-addr 127.0.0.1:50051

Layout: settings.py (GatewaySettings), app.py (create_app), completions.py and
feedback.py (routes), schemas.py (request bodies), guard.py (keys, rate limits, body
size), store.py (served responses + outbox in SQLite), state.py (what lives between
requests), metrics.py, errors.py, static/ (the web page). The outbox and its relay to
Kafka are rlhf.outbox.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

import uvicorn

from rlhf.serving import load_settings
from rlhf.serving.logs import setup_logging
from rlhf.tracing import setup_tracing, shutdown_tracing
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

log = logging.getLogger("gateway")

__all__ = ["GatewaySettings", "create_app", "main", "serve"]


async def serve(settings: GatewaySettings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),
    )
    server = uvicorn.Server(config)
    # uvicorn installs its own handlers; we take SIGTERM ourselves to flip readiness first
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():  # could not bind, or the lifespan failed
        return 1 if task.exception() or not server.started else 0
    app.state.ready = True
    log.info("serving", extra={"address": f"http://{settings.host}:{settings.http_port}"})
    await asyncio.wait({task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    # Drain: report NOT_SERVING first and keep answering while load balancers catch up,
    # then stop accepting and give in-flight requests (streams too) drain_seconds.
    app.state.ready = False
    log.info("draining", extra={"unready_seconds": settings.unready_seconds, "grace_seconds": settings.drain_seconds})
    if not task.done():
        await asyncio.wait({task}, timeout=settings.unready_seconds)
    server.should_exit = True
    await task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GatewaySettings, sys.argv[1:] if argv is None else argv, prog="rlhf-gateway")
    setup_logging("gateway", settings.log_level, settings.log_format)
    setup_tracing("gateway", settings)
    try:
        return asyncio.run(serve(settings))
    finally:
        shutdown_tracing()
