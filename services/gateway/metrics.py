"""The gateway's Prometheus metrics (the outbox's own live in rlhf.outbox) and the ASGI
middleware that counts and times every request by route template, never by raw path."""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("rlhf_gateway_requests_total", "HTTP requests answered, by route and status code", ["route", "code"])
REQUEST_SECONDS = Histogram(
    "rlhf_gateway_request_seconds",
    "Time from request to the last byte of the response (streams included), by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TOKENS_STREAMED = Counter("rlhf_gateway_tokens_streamed_total", "Completion tokens sent to clients in SSE streams")
COMPLETION_TOKENS = Counter("rlhf_gateway_completion_tokens_total", "Completion tokens served, streaming or not")
FEEDBACK = Counter(
    "rlhf_feedback_events_total", "Feedback events accepted into the outbox, by kind", ["kind"]
)  # kind: thumbs_up | thumbs_down | comparison
FEEDBACK_RATERS = Counter(
    "rlhf_gateway_feedback_raters_total",
    "Feedback events accepted, by how the rater was identified (never by rater: ids are unbounded)",
    ["identity"],
)  # identity: key | header | cookie | anonymous
RATER_COOKIES_IGNORED = Counter(
    "rlhf_gateway_rater_cookies_ignored_total",
    "Rater cookies whose signature did not verify (forged, tampered, or signed under another rater_secret); "
    "their feedback counts as anonymous",
)
PII_REDACTIONS = Counter(
    "rlhf_gateway_pii_redactions_total",
    "PII replaced by a placeholder in stored or published text (prompts, answers, comments, corrections), by type",
    ["type"],
)  # type: email | phone | credit_card | secret | ip_address
INTERACTIONS = Counter("rlhf_gateway_interactions_total", "Completed chats queued for rlhf.interactions")
GENERATOR_ERRORS = Counter("rlhf_gateway_generator_errors_total", "Generate calls that failed, by gRPC code", ["code"])


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, known_paths: Iterable[str] = ()):
        self.app = app
        self.known = set(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        code = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.known else "other")
            REQUESTS.labels(path, str(code)).inc()
            REQUEST_SECONDS.labels(path).observe(time.perf_counter() - start)


COMPARE_SELECTIONS = Counter(
    "rlhf_gateway_compare_selections_total",
    "Comparisons (n=2) shown as a pair chosen from compare_candidates samples, by the selection that applied",
    ["selection"],
)  # selection: rm_uncertain | rm_extremes | diverse | first (a fallback)
COMPARE_FALLBACKS = Counter(
    "rlhf_gateway_compare_fallbacks_total",
    "RM-selected comparisons (rm_uncertain, rm_extremes) and best-of-n chats that showed the first sample(s) "
    "instead, by reason (the Score call's gRPC code, or bad_scores)",
    ["reason"],
)
BEST_OF_SELECTIONS = Counter(
    "rlhf_gateway_best_of_selections_total",
    "One-answer chats served as the reward model's best of serve_best_of samples, by the selection that applied",
    ["selection"],
)  # selection: rm_best | first (a fallback)


# the canary (issue 15): which version answered, by role, never by version number (unbounded)
REQUESTS_BY_VERSION = Counter(
    "rlhf_gateway_requests_by_version_total",
    "Completions answered, by the role of the version that answered (stable, candidate); a cross-version "
    "comparison counts once for each",
    ["role"],
)
CANARY_COMPARISONS = Counter(
    "rlhf_gateway_canary_comparisons_total",
    "Comparisons (n=2) while a candidate ran, by pairing: cross (candidate against stable) or same (one version)",
    ["pairing"],
)
