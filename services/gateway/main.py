"""Chat gateway: OpenAI-compatible HTTP API and web chat; feedback into a durable outbox."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from rlhf.serving import CommonSettings, load_settings
from rlhf.serving.logs import setup_logging

log = logging.getLogger("gateway")


class GatewaySettings(CommonSettings):
    http_port: int = Field(8000, description="HTTP port of the API and web page (also serves /metrics)")
    generator_addr: str = Field("127.0.0.1:50051", description="GenerationService address")


def create_app(settings: GatewaySettings) -> FastAPI:
    app = FastAPI(title="rlhf gateway", version="0.1.0")
    app.state.ready = False

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(response: Response) -> dict:
        if not app.state.ready:
            response.status_code = 503
            return {"status": "NOT_SERVING"}
        return {"status": "SERVING"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(settings: GatewaySettings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_config=None, lifespan="on")
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
    app.state.ready = True
    log.info("serving", extra={"address": f"http://{settings.host}:{settings.http_port}"})
    await asyncio.wait({task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    app.state.ready = False
    log.info("draining", extra={"grace_seconds": settings.drain_seconds})
    server.should_exit = True
    await task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(GatewaySettings, sys.argv[1:] if argv is None else argv, prog="rlhf-gateway")
    setup_logging("gateway", settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))
