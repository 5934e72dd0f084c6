"""Prometheus metrics of the generation service (units in the names, `_total` on counters).

The request metrics follow vLLM's serving metrics where one fits (vLLM's name in brackets):
time per output token (`vllm:time_per_output_token_seconds`), queue time
(`vllm:request_queue_time_seconds`), requests waiting and running (`vllm:num_requests_waiting`
/ `_running`) and finish reasons (`vllm:request_success_total{finished_reason}`). A backend
keeps one `RequestStats` per request and reports its timeline to it; the finish reasons are
counted by the generator, the same for every backend."""

from __future__ import annotations

import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from rlhf.priorities import INTERACTIVE

POLICY_VERSION = Gauge("rlhf_generator_policy_version", "Policy version new requests are served with")
WEIGHT_SYNC_SECONDS = Histogram(
    "rlhf_weight_sync_seconds",
    "Time from a weight update's arrival to serving it, by format",
    ["format"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
WEIGHT_UPDATES = Counter(
    "rlhf_weight_updates_total", "Weight updates, by format and result (served/refused)", ["format", "result"]
)
TOKENS = Counter("rlhf_generation_tokens_total", "Tokens processed, by kind (prompt/completion)", ["kind"])
REQUESTS_IN_FLIGHT = Gauge("rlhf_generation_requests_in_flight", "Generate calls holding a policy-version lease")
FIRST_TOKEN_SECONDS = Histogram(
    "rlhf_generation_time_to_first_token_seconds",
    "Time from a request's arrival at the engine to its first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "rlhf_generator_time_per_output_token_seconds",
    "Mean time between the tokens of one sample after its first (a sample of one token is not observed)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5),
)
QUEUE_SECONDS = Histogram(
    "rlhf_generator_queue_time_seconds",
    "Time from a request's arrival at the engine to its first decode step, by priority class (chat/rollout)",
    ["priority"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REQUESTS_WAITING = Gauge(
    "rlhf_generator_requests_waiting",
    "Requests queued for the engine, not decoding yet, by priority class",
    ["priority"],
)
REQUESTS_RUNNING = Gauge(
    "rlhf_generator_requests_running", "Requests the engine is decoding, by priority class", ["priority"]
)
FINISHED = Counter(
    "rlhf_generator_finished_total",
    "Samples ended, by finish reason: stop (EOS or a stop string), length (max_tokens or the context), "
    "cancelled (the caller went away), error (the engine failed)",
    ["finish_reason"],
)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
PRIORITY_CLASSES = ("chat", "rollout")
for _reason in FINISH_REASONS:  # every series exists from the start: rate() needs no first event
    FINISHED.labels(_reason)
for _cls in PRIORITY_CLASSES:
    QUEUE_SECONDS.labels(_cls), REQUESTS_WAITING.labels(_cls), REQUESTS_RUNNING.labels(_cls)


def priority_class(priority: int) -> str:
    """ "chat" for a person waiting (rlhf.priorities.INTERACTIVE or more urgent), "rollout"
    for background work (the rollout worker, `rlhf eval`)."""
    return "chat" if priority <= INTERACTIVE else "rollout"


class RequestStats:
    """One request's timeline in a backend: arrival (construction), its first decode step
    (`scheduled`), each token of each sample (`token`), the end (`done`). Safe to call from
    the engine thread and the event loop at once; each step counts once."""

    def __init__(self, priority: int, now: float | None = None):
        self.cls = priority_class(priority)
        self.arrived = time.perf_counter() if now is None else now
        self._lock = threading.Lock()
        self._state = "waiting"
        self._first_token: float | None = None
        self._samples: dict[int, tuple[float, float, int]] = {}  # index → (first, last token time, tokens)
        REQUESTS_WAITING.labels(self.cls).inc()

    def scheduled(self, now: float | None = None) -> None:
        with self._lock:
            if self._state != "waiting":
                return
            self._state = "running"
        QUEUE_SECONDS.labels(self.cls).observe((time.perf_counter() if now is None else now) - self.arrived)
        REQUESTS_WAITING.labels(self.cls).dec()
        REQUESTS_RUNNING.labels(self.cls).inc()

    def token(self, index: int, count: int = 1, now: float | None = None) -> None:
        """`count` new tokens of sample `index`, generated at `now`."""
        now = time.perf_counter() if now is None else now
        self.scheduled(now)
        with self._lock:
            first_of_request = self._first_token is None
            if first_of_request:
                self._first_token = now
            first, _, n = self._samples.get(index, (now, now, 0))
            self._samples[index] = (first, now, n + count)
        if first_of_request:
            FIRST_TOKEN_SECONDS.observe(now - self.arrived)

    def sample_done(self, index: int) -> None:
        """Sample `index` ended: its time per output token, (last - first) / (tokens - 1)."""
        with self._lock:
            first, last, n = self._samples.pop(index, (0.0, 0.0, 0))
        if n > 1:
            TIME_PER_OUTPUT_TOKEN.observe((last - first) / (n - 1))

    def engine_sample(self, index: int, queue_seconds: float, first_token_seconds: float, tpot_seconds: float) -> None:
        """Sample `index` ended, timed by an engine that keeps its own timeline (vLLM's
        per-request stats) rather than token by token; a negative value was not measured."""
        with self._lock:
            first_of_request = self._first_token is None
            self._first_token = self._first_token or time.perf_counter()
        if queue_seconds >= 0:
            self.scheduled(now=self.arrived + queue_seconds)
        else:
            self.scheduled()
        if first_of_request and first_token_seconds >= 0:
            FIRST_TOKEN_SECONDS.observe(first_token_seconds)
        if tpot_seconds >= 0:
            TIME_PER_OUTPUT_TOKEN.observe(tpot_seconds)

    def done(self) -> None:
        with self._lock:
            state, self._state = self._state, "done"
        if state == "waiting":
            REQUESTS_WAITING.labels(self.cls).dec()
        elif state == "running":
            REQUESTS_RUNNING.labels(self.cls).dec()
