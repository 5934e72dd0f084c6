"""POST /v1/feedback: a thumbs up/down on one response, or a pick between two answers to
the same prompt. Answered 202 once the event is committed to the outbox; the relay
delivers it to rlhf.feedback when the broker is there. The event names its rater (decided
by the guard middleware, guard.py) and carries its texts PII-redacted (store.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from opentelemetry import trace

from rlhf import tracing
from services.gateway.body import JsonRoute
from services.gateway.errors import ApiError
from services.gateway.guard import ANONYMOUS, Rater
from services.gateway.metrics import FEEDBACK, FEEDBACK_RATERS
from services.gateway.schemas import FeedbackIn, RatingIn
from services.gateway.state import Gateway

router = APIRouter(route_class=JsonRoute)


@router.post("/v1/feedback", status_code=202)
@tracing.http_span("feedback")
async def feedback(request: Request, body: FeedbackIn) -> JSONResponse:
    fb = body.root
    gw: Gateway = request.app.state.gw
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
    else:
        FEEDBACK.labels("comparison").inc()
    return JSONResponse(
        {"status": "accepted", "event_id": event.event_id, "conversation_id": event.conversation_id}, status_code=202
    )
