"""What the gateway costs: latency it adds over a direct gRPC Generate, and feedback
requests/s it sustains with every event committed (fsync) to the SQLite outbox.

    .venv/bin/python benchmarks/gateway.py                 # tiny random model, 300 pairs
    .venv/bin/python benchmarks/gateway.py --model demo --max-tokens 16

Starts an embedded broker, the generator and the gateway as real processes (loopback).
Latency: the same request (greedy, fixed prompt) alternately straight to the generator
over gRPC and through the gateway over HTTP (keep-alive), so both see the same load;
"added" is the gateway's percentile minus the direct one. The gateway's side includes
parsing, the gRPC hop, storing the served response and the Interaction event (one
group-committed SQLite transaction) and the JSON answer. Feedback: POST /v1/feedback
from C concurrent clients, each answer 202 only after the outbox commit.

Trust A/B (`--ab-feedback N`, 0 = skip): a gateway in front of the same generator with PII
redaction and rater identity on (each client a web-cookie rater, a per-rater limit high
enough never to refuse) against the first with both off (redact_pii=false, anonymous)
and against a twin of the first (off too: the off/twin difference is the noise floor),
the same feedback body (a comment and a corrected answer of ~300 characters holding an
e-mail address, a phone number and a card number) to each, in rounds that rotate which
arm goes first; the median round of each is reported, and the in-process CPU cost of
each step.
Prints markdown tables (docs/gateway.md records them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.broker import EmbeddedBroker  # noqa: E402
from rlhf.bus import Topics, ensure_topics  # noqa: E402
from rlhf.launcher import ServiceSpec, Stack  # noqa: E402
from rlhf.serving.client import sync_channel  # noqa: E402
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc  # noqa: E402
from services.gateway.guard import RATER_COOKIE  # noqa: E402

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_latency(stub, http: httpx.Client, pairs: int, max_tokens: int, stream: bool) -> dict[str, list[float]]:
    """Alternating direct / gateway calls; seconds to the full answer (or first token when stream)."""
    req = generation_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in PROMPT]),
        params=generation_pb2.SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens),
    )
    body = {"model": "policy", "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
    out: dict[str, list[float]] = {"direct": [], "gateway": [], "overhead": [], "floor": []}
    for i in range(pairs + 5):
        t0 = time.perf_counter()
        if stream:
            messages = iter(stub.GenerateStream(req, timeout=60))
            next(messages)
            first = time.perf_counter()
            for _ in messages:  # let it finish, so the next call starts on an idle generator
                pass
        else:
            stub.Generate(req, timeout=60)
        t1 = time.perf_counter()
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                t2 = None
                for line in r.iter_lines():
                    if t2 is None and '"content":"' in line and '"content":""' not in line:
                        t2 = time.perf_counter()  # first token
        else:
            r = http.post("/v1/chat/completions", json=body)
            t2 = time.perf_counter()
            r.raise_for_status()
            generate = float(r.headers["server-timing"].split("dur=")[1]) / 1000
            http.get("/healthz")  # the floor: an HTTP round trip that does nothing
            t3 = time.perf_counter()
        if i >= 5:  # warm-up
            out["direct"].append((first if stream else t1) - t0)
            out["gateway"].append(t2 - t1)
            if not stream:
                out["overhead"].append(t2 - t1 - generate)
                out["floor"].append(t3 - t2)
    return out


async def bench_feedback(url: str, response_id: str, total: int, concurrency: int) -> float:
    """Feedback requests/s with `concurrency` clients in flight."""
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            r = await client.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": 1})
            if r.status_code != 202:
                raise RuntimeError(r.text)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await client.post("/v1/feedback", json={"kind": "rating", "response_id": response_id, "value": 1})
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return total / (time.perf_counter() - t0)


AB_TEXT = (
    "The answer is wrong about the refund. I paid with 4111 1111 1111 1111 on the 3rd and support "
    "(jane.doe@example.com, +1 (415) 555-0100) said it would take five working days. A better answer "
    "would say how long refunds take and where to check their status, without guessing a date."
)


async def bench_feedback_ab(url: str, response_id: str, total: int, concurrency: int, identity: bool) -> float:
    """Feedback requests/s, `concurrency` clients each with its own connection; with
    `identity`, each first loads the page and so rates under its own signed cookie.

    Both arms send one cookie header of the same length as a plain header (the anonymous
    arm a cookie the gateway does not read), outside httpx's cookie jar: the jar costs the
    Python client ≈ 0.2 ms a request, which on 2 shared cores would be billed to the arm
    with the cookie."""
    body = {"kind": "rating", "response_id": response_id, "value": -1, "comment": AB_TEXT, "corrected_answer": AB_TEXT}
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(concurrency)]
    for client in clients:
        if identity:
            (await client.get("/")).raise_for_status()
            value = client.cookies[RATER_COOKIE]
            client.cookies.clear()
            client.headers["cookie"] = f"{RATER_COOKIE}={value}"
        else:
            client.headers["cookie"] = "unread_cookie=" + "x" * 66  # the length of a rater cookie
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            r = await client.post("/v1/feedback", json=body)
            if r.status_code != 202:
                raise RuntimeError(r.text)

    try:
        for client in clients:
            (await client.post("/v1/feedback", json=body)).raise_for_status()  # warm connection
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        return total / (time.perf_counter() - t0)
    finally:
        for client in clients:
            await client.aclose()


def trust_steps_us(reps: int = 2000) -> dict[str, float]:
    """What redaction and identity add to one feedback, without HTTP or the outbox."""
    from services.gateway.guard import RateLimiter, RaterCookies
    from services.gateway.store import Scrubber

    scrub, cookies = Scrubber(True), RaterCookies(b"x" * 32)
    limiter = RateLimiter(100000, 100000, "feedback_rate_limit")
    cookie = cookies.issue()

    def median_us(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)

    return {
        "redact comment + corrected answer (2 × 300 chars, 3 PII each)": median_us(
            lambda: (scrub(AB_TEXT), scrub(AB_TEXT))
        ),
        "verify the rater cookie (HMAC-SHA256)": median_us(lambda: cookies.verify(cookie)),
        "per-rater limit (limits sliding window)": median_us(lambda: limiter.acquire("web:abc")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help='"tiny" (random, built now), "demo", or a model folder')
    ap.add_argument("--pairs", type=int, default=300, help="direct/gateway request pairs per latency row")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--feedback", type=int, default=2000, help="feedback posts per concurrency level")
    ap.add_argument("--concurrency", default="1,16", help="feedback client concurrency levels")
    ap.add_argument(
        "--ab-feedback", type=int, default=500, help="feedback posts per round of the trust A/B (0 = skip it)"
    )
    ap.add_argument(
        "--ab-rounds",
        type=int,
        default=6,
        help="rounds of the trust A/B (each arm once a round; a multiple of 3 puts each first equally often)",
    )
    ap.add_argument("--skip-latency", action="store_true", help="only the feedback measurements")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = args.model
    if model == "tiny":
        from rlhf.models import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))

    broker = EmbeddedBroker(log_path=work / "broker.log").start()
    topics = Topics("bench")
    ensure_topics(broker.bootstrap, topics.all())
    gen = ServiceSpec("generator", "services.generator", free_port(), 0)
    gw = ServiceSpec("gateway", "services.gateway", free_port(), 0, http=True)
    gen.env.update(
        {
            "RLHF_PORT": str(gen.port),
            "RLHF_METRICS_PORT": "0",
            "RLHF_FOLLOW_POLICY_UPDATES": "false",
            "RLHF_BACKEND": "transformers",
            "RLHF_MODEL": model,
        }
    )
    # the plain gateway, as before; redact_pii off so the A/B compares against no redaction at all
    gw.env.update({"RLHF_HTTP_PORT": str(gw.port), "RLHF_GENERATOR_ADDR": gen.address, "RLHF_REDACT_PII": "false"})
    # a twin of the plain gateway: the off/off difference is the noise floor of the A/B
    twin = ServiceSpec("gateway-twin", "services.gateway", free_port(), 0, http=True)
    twin.env.update(
        {
            "RLHF_HTTP_PORT": str(twin.port),
            "RLHF_GENERATOR_ADDR": gen.address,
            "RLHF_OUTBOX_PATH": str(work / "twin-outbox.db"),
            "RLHF_REDACT_PII": "false",
        }
    )
    trusted = ServiceSpec("gateway-trusted", "services.gateway", free_port(), 0, http=True)
    trusted.env.update(
        {
            "RLHF_HTTP_PORT": str(trusted.port),
            "RLHF_GENERATOR_ADDR": gen.address,
            "RLHF_OUTBOX_PATH": str(work / "trusted-outbox.db"),
            "RLHF_REDACT_PII": "true",
            "RLHF_FEEDBACK_RATE_LIMIT_RPS": "100000",
            "RLHF_FEEDBACK_RATE_LIMIT_BURST": "100000",
        }
    )
    env = {
        "RLHF_STATE_DIR": str(work / "state"),
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": topics.prefix,
        "RLHF_LOG_LEVEL": "WARNING",
        "RLHF_HOST": "127.0.0.1",
    }
    stack = Stack([gen, gw, *([twin, trusted] if args.ab_feedback else [])], env, work / "logs", drain_seconds=2)
    try:
        stack.start()
        stack.wait_healthy(300, progress=lambda m: None)
        stub = generation_pb2_grpc.GenerationServiceStub(sync_channel(gen.address))
        rows, overhead, floor = [], [], []
        with httpx.Client(base_url=gw.url, timeout=60) as http:
            for stream in (False, True) if not args.skip_latency else ():
                lat = bench_latency(stub, http, args.pairs, args.max_tokens, stream)
                d, g = lat["direct"], lat["gateway"]
                rows.append(
                    (
                        "stream, first token" if stream else "non-streaming",
                        *(
                            1000 * x
                            for x in (
                                pct(d, 50),
                                pct(d, 99),
                                pct(g, 50),
                                pct(g, 99),
                                pct(g, 50) - pct(d, 50),
                                pct(g, 99) - pct(d, 99),
                            )
                        ),
                    )
                )
                overhead += lat["overhead"]
                floor += lat["floor"]
            rid = http.post("/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 2}).json()["choices"][0][
                "response_id"
            ]
        fb = [
            (c, asyncio.run(bench_feedback(gw.url, rid, args.feedback, c)))
            for c in map(int, args.concurrency.split(","))
        ]
        ab = []
        if args.ab_feedback:
            with httpx.Client(base_url=trusted.url, timeout=60) as http:
                # a prompt with PII: the trusted gateway stores it redacted, the plain one as it came
                pii_prompt = [{"role": "user", "content": "My card 4111 1111 1111 1111 was charged twice. Why?"}]
                body = {"messages": pii_prompt, "max_tokens": 2}
                arms = {"off": (gw, False), "off, twin": (twin, False), "on": (trusted, True)}
                rids = {
                    arm: http.post(f"{spec.url}/v1/chat/completions", json=body).json()["choices"][0]["response_id"]
                    for arm, (spec, _) in arms.items()
                }
            for c in map(int, args.concurrency.split(",")):
                rps: dict[str, list[float]] = {arm: [] for arm in arms}
                for r in range(args.ab_rounds):
                    order = list(arms)[r % 3 :] + list(arms)[: r % 3]  # each arm first, second, third in turn
                    for arm in order:
                        spec, identity = arms[arm]
                        rate = asyncio.run(bench_feedback_ab(spec.url, rids[arm], args.ab_feedback, c, identity))
                        rps[arm].append(rate)
                ab.append((c, rps))
    finally:
        stack.stop()
        broker.stop()

    print(
        f"\nmodel={Path(model).name} max_tokens={args.max_tokens} pairs={args.pairs} cpus={os.cpu_count()} "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    if not args.skip_latency:
        print("Alternating direct gRPC / gateway HTTP calls (ms):\n")
        print("| request | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 |")
        print("|---|---|---|---|---|---|---|")
        for name, *vals in rows:
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
        print("\nGateway's own time per non-streaming request: client-observed latency minus the Generate call the")
        print("gateway timed itself (Server-Timing), i.e. HTTP, validation, SQLite commit, JSON; and, measured")
        print("in the same loop, an HTTP round trip to /healthz that does nothing (ms):\n")
        print("| | p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|")
        for name, xs in (("gateway's own time", overhead), ("GET /healthz", floor)):
            ms = [1000 * x for x in xs]
            print(f"| {name} | {pct(ms, 50):.2f} | {pct(ms, 90):.2f} | {pct(ms, 99):.2f} | {max(ms):.2f} |")
    print("\n| feedback clients | requests/s (each 202 after its outbox commit, synchronous=FULL) |")
    print("|---|---|")
    for c, rps in fb:
        print(f"| {c} | {rps:.0f} |")
    if ab:
        print("\nIn-process CPU per feedback on the trusted gateway, this machine (µs, median of 2000):\n")
        print("| step | µs |")
        print("|---|---|")
        for step, us in trust_steps_us().items():
            print(f"| {step} | {us:.1f} |")
        print(
            f"\nTrust A/B: feedback requests/s, median of {args.ab_rounds} rotating rounds of "
            f"{args.ab_feedback} posts (min–max in brackets):\n"
        )
        print("| feedback clients | off | off, twin | on | on vs off | twin vs off (noise) |")
        print("|---|---|---|---|---|---|")
        for c, rps in ab:
            med = {arm: statistics.median(xs) for arm, xs in rps.items()}
            cells = [f"{med[a]:.0f} ({min(rps[a]):.0f}–{max(rps[a]):.0f})" for a in rps]
            print(
                f"| {c} | " + " | ".join(cells) + f" | {100 * (med['on'] / med['off'] - 1):+.1f} % "
                f"| {100 * (med['off, twin'] / med['off'] - 1):+.1f} % |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
