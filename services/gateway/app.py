"""create_app: routes, middleware and the lifespan that opens and closes the gateway's parts."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway import completions, errors, feedback
from services.gateway.guard import GuardMiddleware, RateLimiter, RaterCookies, load_hook, rater_secret, static_keys
from services.gateway.metrics import MetricsMiddleware
from services.gateway.settings import GatewaySettings
from services.gateway.state import Gateway

log = logging.getLogger("gateway")
STATIC = Path(__file__).parent / "static"
# The web page runs only its own scripts (app.js and the vendored marked/DOMPurify, same
# origin): an answer that slips markup past the sanitizer still cannot run inline script,
# load a remote one, or beacon out through an <img> to another host.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def create_app(settings: GatewaySettings) -> FastAPI:
    """The ASGI app. `app.state.ready` is flipped by serve(): True once listening, False
    from the first moment of draining; /readyz also needs the generator SERVING."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway(settings)
        app.state.gw = gw
        await gw.start()
        log.info("outbox open", extra={"path": str(settings.outbox_file()), "kafka": settings.kafka_bootstrap})
        try:
            yield
        finally:
            await gw.close(flush_timeout=settings.drain_seconds)

    app = FastAPI(title="rlhf gateway", version="0.1.0", lifespan=lifespan)
    app.state.ready = False
    errors.install(app)
    app.include_router(completions.router)
    app.include_router(feedback.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(response: Response) -> dict:
        gw: Gateway = app.state.gw
        ready = app.state.ready and gw.generator_status == "SERVING"
        response.status_code = 200 if ready else 503
        # Kafka is reported, not required: feedback keeps going into the outbox while it is away
        kafka = "SERVING" if gw.relay.publisher.watch.healthy else "NOT_SERVING"
        return {"status": "SERVING" if ready else "NOT_SERVING", "generator": gw.generator_status, "kafka": kafka}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", headers={"cache-control": "no-cache", "content-security-policy": PAGE_CSP}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    secret = rater_secret(settings.rater_secret.get_secret_value(), settings.state_dir)
    authenticate = (
        load_hook(settings.auth_hook)
        if settings.auth_hook
        else static_keys(settings.api_keys, secret)
        if settings.api_keys
        else None
    )
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst) if settings.rate_limit_rps > 0 else None
    feedback_limiter = (
        RateLimiter(settings.feedback_rate_limit_rps, settings.feedback_rate_limit_burst, "feedback_rate_limit")
        if settings.feedback_rate_limit_rps > 0
        else None
    )
    # added last = outermost: metrics see every answer, the guard's refusals included
    app.add_middleware(
        GuardMiddleware,
        authenticate=authenticate,
        limiter=limiter,
        max_body_bytes=settings.max_body_bytes,
        cookies=RaterCookies(secret),
        rater_header=settings.rater_header,
        feedback_limiter=feedback_limiter,
    )
    app.add_middleware(MetricsMiddleware, known_paths=[r.path for r in app.routes if hasattr(r, "path")])
    return app
