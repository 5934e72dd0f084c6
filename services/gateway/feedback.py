"""POST /v1/feedback: a thumbs up/down on one response, or a pick between two answers to
the same prompt. Answered 202 once the event is committed to the outbox; the relay
delivers it to rlhf.feedback when the broker is there."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.errors import ApiError
from services.gateway.metrics import FEEDBACK
from services.gateway.schemas import FeedbackIn, RatingIn
from services.gateway.state import Gateway

router = APIRouter()


@router.post("/v1/feedback", status_code=202)
async def feedback(request: Request, body: FeedbackIn) -> JSONResponse:
    fb = body.root
    gw: Gateway = request.app.state.gw
    limit = gw.settings.max_feedback_chars
    for field in ("comment", "corrected_answer"):
        if len(getattr(fb, field)) > limit:
            raise ApiError(413, f"{field}: {len(getattr(fb, field))} characters; the limit is max_feedback_chars={limit}", field)
    event = await gw.store.add_feedback(fb)
    if isinstance(fb, RatingIn):
        FEEDBACK.labels("thumbs_up" if fb.value > 0 else "thumbs_down").inc()
    else:
        FEEDBACK.labels("comparison").inc()
    return JSONResponse(
        {"status": "accepted", "event_id": event.event_id, "conversation_id": event.conversation_id}, status_code=202
    )
