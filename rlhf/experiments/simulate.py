"""`rlhf simulate`: simulated users chat through the real gateway and give oracle feedback.

Each simulated user, in a loop:
  1. picks a prompt from the training prompt set
  2. asks the gateway for an answer (thumbs) or two (pairwise, n=2)
  3. judges with the oracle and POSTs /v1/feedback: the better of the two as a
     comparison, or thumbs up/down by comparing the score with a threshold
until N feedback events were accepted (HTTP 202). Ties give no comparison (a person who
sees no difference skips), so they cost a chat but no feedback.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlhf.experiments.clients import Endpoints, Gateway
from rlhf.experiments.oracles import Oracle, load_oracle
from rlhf.prompts import load_prompt_texts


@dataclass
class SimStats:
    accepted: int = 0  # feedback events the gateway accepted
    chats: int = 0
    ties: int = 0  # comparisons skipped: the oracle saw no difference
    errors: int = 0
    ups: int = 0
    downs: int = 0
    versions: dict[int, int] = field(default_factory=dict)  # policy version → answers seen
    oracle_scores: deque = field(default_factory=lambda: deque(maxlen=200))

    def as_dict(self) -> dict:
        recent = list(self.oracle_scores)
        return {
            "feedback_accepted": self.accepted,
            "chats": self.chats,
            "ties_skipped": self.ties,
            "errors": self.errors,
            "thumbs_up": self.ups,
            "thumbs_down": self.downs,
            "policy_versions": {str(k): v for k, v in sorted(self.versions.items())},
            "latest_policy_version": max(self.versions) if self.versions else None,
            "oracle_mean_recent": statistics.fmean(recent) if recent else None,
        }


class Thumbs:
    """Thumbs up iff the score beats `threshold`, or, with none given, the running median
    of the scores seen so far (about half up, half down, whatever the oracle's scale)."""

    def __init__(self, threshold: float | None = None, window: int = 200):
        self.threshold = threshold
        self.seen: deque[float] = deque(maxlen=window)

    def __call__(self, score: float) -> int:
        bar = self.threshold if self.threshold is not None else (statistics.median(self.seen) if self.seen else score)
        self.seen.append(score)
        if score == bar:
            return 1 if random.random() < 0.5 else -1
        return 1 if score > bar else -1


def one_interaction(
    gw: Gateway,
    oracle: Oracle,
    prompt: str,
    mode: str,
    thumbs: Thumbs,
    stats: SimStats,
    lock: threading.Lock,
    max_tokens: int | None,
) -> int:
    """One chat and its feedback; returns the feedback events accepted (0 or 1)."""
    n = 2 if mode == "pairwise" else 1
    body = gw.chat(prompt, n=n, max_tokens=max_tokens)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    scores = [oracle(prompt, c["message"]["content"]) for c in choices]
    with lock:
        stats.chats += 1
        v = int(body.get("policy_version", 0))
        stats.versions[v] = stats.versions.get(v, 0) + len(choices)
        stats.oracle_scores.extend(scores)
    if mode == "pairwise":
        if scores[0] == scores[1]:
            with lock:
                stats.ties += 1
            return 0
        best, worst = (choices[0], choices[1]) if scores[0] > scores[1] else (choices[1], choices[0])
        gw.compare(best["response_id"], worst["response_id"])
        return 1
    with lock:
        value = thumbs(scores[0])
        stats.ups += value > 0
        stats.downs += value < 0
    gw.rate(choices[0]["response_id"], value)
    return 1


def simulate(
    gateway_url: str,
    oracle: Oracle,
    feedback: int,
    mode: str = "pairwise",
    prompts: list[str] | None = None,
    concurrency: int = 2,
    threshold: float | None = None,
    api_key: str | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    progress=print,
    progress_every: float = 5.0,
    stats: SimStats | None = None,
    stop: threading.Event | None = None,
    hold: threading.Event | None = None,
) -> SimStats:
    """Run simulated users until `feedback` events were accepted (or `stop` is set); returns
    the counts. Pass `stats` to watch them from another thread while it runs. While `hold`
    is set no new chat starts (those in flight finish): the users pause."""
    if mode not in ("pairwise", "thumbs", "mixed"):
        raise ValueError(f"mode must be pairwise, thumbs or mixed, got {mode!r}")
    prompts = prompts or load_prompt_texts("train")
    rng = random.Random(seed)
    stats = stats if stats is not None else SimStats()
    lock, thumbs = threading.Lock(), Thumbs(threshold)
    started = time.monotonic()
    last_report = started
    max_errors = max(10, feedback // 5)

    def task(i: int) -> int:
        with lock:
            prompt = rng.choice(prompts)
            m = mode if mode != "mixed" else ("pairwise" if i % 2 == 0 else "thumbs")
        try:
            return one_interaction(gw, oracle, prompt, m, thumbs, stats, lock, max_tokens)
        except Exception as e:  # noqa: BLE001 - a failed chat is counted and retried with another prompt
            with lock:
                stats.errors += 1
                if stats.errors <= 3:
                    progress(f"[simulate] error: {e}")
            return 0

    with Gateway(gateway_url, api_key=api_key) as gw, ThreadPoolExecutor(concurrency) as pool:
        i = 0
        inflight = set()
        while stats.accepted < feedback and not (stop is not None and stop.is_set() and not inflight):
            while (
                len(inflight) < concurrency
                and stats.accepted + len(inflight) < feedback
                and not (stop is not None and stop.is_set())
                and not (hold is not None and hold.is_set())
            ):
                inflight.add(pool.submit(task, i))
                i += 1
            done = {f for f in inflight if f.done()}
            if not done:
                time.sleep(0.02)
                continue
            for f in done:
                inflight.discard(f)
                stats.accepted += f.result()
            if stats.errors > max_errors:
                raise RuntimeError(f"{stats.errors} failed interactions: is the stack up at {gateway_url}?")
            now = time.monotonic()
            if now - last_report >= progress_every or stats.accepted >= feedback:
                last_report = now
                d = stats.as_dict()
                rate = stats.accepted / max(now - started, 1e-9)
                mean = "-" if d["oracle_mean_recent"] is None else f"{d['oracle_mean_recent']:+.3f}"
                version = "-" if d["latest_policy_version"] is None else f"v{d['latest_policy_version']}"
                progress(
                    f"[simulate] {stats.accepted}/{feedback} feedback, {stats.chats} chats, {stats.errors} errors, "
                    f"policy {version}, oracle mean {mean}, {rate:.2f} events/s"
                )
    return stats


def main(args) -> int:
    import os

    try:
        oracle = load_oracle(args.oracle)
    except ValueError as e:
        print(f"rlhf simulate: {e}", file=sys.stderr)
        return 2
    ep = Endpoints.discover(args.state_dir, gateway=args.gateway)
    prompts = load_prompt_texts("train", args.prompts)
    print(
        f"[simulate] {args.feedback} {args.mode} feedback events from oracle {args.oracle} via {ep.gateway} "
        f"({len(prompts)} prompts, {args.concurrency} users)",
        flush=True,
    )
    t0 = time.monotonic()
    try:
        stats = simulate(
            ep.gateway,
            oracle,
            args.feedback,
            args.mode,
            prompts,
            args.concurrency,
            args.threshold,
            args.api_key or os.environ.get("RLHF_API_KEY"),
            args.max_tokens,
            args.seed,
            progress=lambda m: print(m, flush=True),
        )
    except RuntimeError as e:
        print(f"rlhf simulate: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**stats.as_dict(), "seconds": round(time.monotonic() - t0, 1)}))
    return 0
