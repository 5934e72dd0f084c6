"""POST /v1/feedback: a thumbs up/down on one response, or a judgement of two answers to
the same prompt (one preferred, a tie, or both bad), with optional named scores, tags,
metadata, a comment and a corrected answer. Answered 202 once the event is committed to
the outbox; the relay delivers it to rlhf.feedback when the broker is there. The event
names its rater (decided by the guard middleware, guard.py), carries its texts
PII-redacted (store.py), and supersedes the rater's earlier vote on the same answer(s).

A rating names its answer by the choice's `response_id`, by the completion's top-level
`id` when it had one choice, or by the X-Response-Id header (either id).

GET /v1/feedback: the stored feedback events, oldest first, filtered by conversation,
response, rater and time, a page at a time (`cursor`). It needs one of the
`feedback_export_keys` as `Authorization: Bearer <key>` (403 while none is configured):
feedback names its raters and what they wrote, so it is not open to every API key."""

from __future__ import annotations

import hmac
import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from opentelemetry import trace

from rlhf import tracing
from services.gateway.body import JsonRoute
from services.gateway.errors import ApiError
from services.gateway.guard import ANONYMOUS, Rater, _api_key
from services.gateway.metrics import FEEDBACK, FEEDBACK_RATERS
from services.gateway.schemas import ID_PATTERN, FeedbackIn, RatingIn
from services.gateway.state import Gateway
from services.gateway.store import MAX_PAGE

router = APIRouter(route_class=JsonRoute)


@router.post("/v1/feedback", status_code=202)
@tracing.http_span("feedback")
async def feedback(request: Request, body: FeedbackIn) -> JSONResponse:
    fb = body.root
    gw: Gateway = request.app.state.gw
    if isinstance(fb, RatingIn) and fb.response_id is None:
        header = request.headers.get("x-response-id", "").strip()
        if not header:
            raise ApiError(422, "response_id: required (or send the X-Response-Id header)", "response_id")
        if not re.fullmatch(ID_PATTERN, header):
            raise ApiError(422, f"x-response-id: not a response id (pattern {ID_PATTERN})", "x-response-id")
        fb = fb.model_copy(update={"response_id": header})
    # the rated answers' ids are made of their chats' trace ids (completions.py): link to them
    rated = [fb.response_id] if isinstance(fb, RatingIn) else [fb.chosen_id, fb.rejected_id]
    span = trace.get_current_span()
    for link in tracing.links_to(rated):
        span.add_link(link.context, {"rlhf.link": "rated chat"})
    span.set_attribute("rlhf.feedback.kind", "rating" if isinstance(fb, RatingIn) else "comparison")
    limit = gw.settings.max_feedback_chars
    for field in ("comment", "corrected_answer"):
        if len(getattr(fb, field)) > limit:
            raise ApiError(
                413, f"{field}: {len(getattr(fb, field))} characters; the limit is max_feedback_chars={limit}", field
            )
    rater: Rater = request.scope.get("state", {}).get("rater", ANONYMOUS)
    event = await gw.store.add_feedback(fb, rater)
    FEEDBACK_RATERS.labels(rater.via).inc()
    span.set_attributes({"rlhf.event_id": event.event_id, "gen_ai.conversation.id": event.conversation_id})
    if isinstance(fb, RatingIn):
        FEEDBACK.labels("thumbs_up" if fb.value > 0 else "thumbs_down").inc()
    elif fb.outcome != "chosen":
        FEEDBACK.labels(fb.outcome).inc()
    else:
        FEEDBACK.labels("comparison").inc()
    body_out = {"status": "accepted", "event_id": event.event_id, "conversation_id": event.conversation_id}
    if event.supersedes_event_id:
        body_out["supersedes"] = event.supersedes_event_id
    return JSONResponse(body_out, status_code=202)


def _export_allowed(request: Request, keys: list[str]) -> None:
    if not keys:
        raise ApiError(403, "feedback export is off: set feedback_export_keys to let a key read it", None)
    given = (_api_key(request.headers) or "").encode()
    if not any([hmac.compare_digest(given, k.encode()) for k in keys]):
        raise ApiError(
            401,
            "GET /v1/feedback needs Authorization: Bearer <key> with one of feedback_export_keys",
            "authorization",
            {"www-authenticate": 'Bearer realm="rlhf-gateway"'},
        )


@router.get("/v1/feedback")
async def list_feedback(
    request: Request,
    conversation_id: str | None = Query(None, pattern=ID_PATTERN),
    response_id: str | None = Query(None, pattern=ID_PATTERN),
    rater_id: str | None = Query(None, max_length=300),
    since_ms: int | None = Query(None, ge=0, description="created at or after (unix ms)"),
    until_ms: int | None = Query(None, ge=0, description="created before (unix ms)"),
    cursor: int = Query(0, ge=0, description="next_cursor of the previous page; 0 = from the start"),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> JSONResponse:
    """A page of stored feedback events (as published, plus `superseded_by`) and the next cursor."""
    gw: Gateway = request.app.state.gw
    _export_allowed(request, gw.settings.feedback_export_keys)
    page, nxt = gw.store.list_feedback(
        conversation_id=conversation_id,
        response_id=response_id,
        rater_id=rater_id,
        since_ms=since_ms,
        until_ms=until_ms,
        after=cursor,
        limit=limit,
    )
    return JSONResponse({"object": "list", "data": page, "next_cursor": nxt})
