"""`rlhf experiment canary`: simulated users against a running `rlhf up` with canaries on, until
the learner's canary decides.

The stack must run with `RLHF_CANARY_ENABLED=true`. The experiment waits for a candidate in
canary (the loop trains one; `--pause` then pauses the learner so no newer version queues
behind it), then simulated users chat through the gateway: each starts a conversation with
a one-answer chat (the gateway's split picks its version; these chats measure the
candidate's share) and, by `--mode`, rates it thumbs up when the oracle scores it above
`--threshold` (thumbs), or asks for a comparison in the same conversation and picks the
answer the oracle scores higher (pairwise; equal scores give no pick), or both (mixed).
It stops when the learner decides (GetCanary's last decision names the candidate), or at
`--max-feedback` / `--timeout`. Progress lines, a CSV of every rated answer (time, version,
role, up) in the run folder, a figure (thumbs-up rate per version over time, the decision
marked) with `--figure`, and a final JSON line:

    {"decision": "promote" | "roll_back" | "none", "candidate": N, "stable": M,
     "feedback_events": ..., "minutes": ..., "max_candidate_share": ..., ...}

`max_candidate_share` is the share of the one-answer chats the candidate answered, over the
chats while it ran (the split promises `canary_share` in expectation; `share_limit` is that
share plus three binomial standard deviations of this many chats).

`run_users` is the core, with a `judge(prompt, response, version)` in place of the oracle:
tests/e2e/test_canary.py gives it users who like or dislike a version outright.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

Judge = Callable[[str, str, int], float]  # (prompt, response, version) -> score, higher is better
Mode = Literal["thumbs", "pairwise", "mixed"]

PROMPTS = (
    "Say hello.",
    "Name a colour.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Tell me a fact about the sea.",
    "How are you today?",
    "Suggest a name for a dog.",
    "What is the capital of France?",
)


# `--oracle` names that judge the version, not the words: a tiny random model's answers carry no
# taste, so on `rlhf up --tiny` these are how a candidate is liked or disliked (the score is
# uniform noise plus LIKED_BONUS for the liked role; with `--threshold 0.8`, 80 % of the liked
# version's answers get a thumbs up and 20 % of the other's)
VERSION_TASTES = ("likes-candidate", "likes-stable")
LIKED_BONUS = 0.6


def version_taste(name: str, candidate: int, stable: int, seed: int) -> Judge:
    """The judge of a VERSION_TASTES name: noise, plus LIKED_BONUS for the version it likes."""
    likes = candidate if name == "likes-candidate" else stable
    rng = random.Random(seed)
    return lambda prompt, response, version: rng.random() + (LIKED_BONUS if version == likes else 0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--oracle",
        required=True,
        help="module:function (prompt, response) -> float, a built-in oracle name, or "
        "likes-candidate / likes-stable (a taste for the version, not the words: for tiny models)",
    )
    p.add_argument("--share", type=float, default=None, help="set the canary's share first (rlhf canary --share)")
    p.add_argument("--mode", choices=("thumbs", "pairwise", "mixed"), default="mixed", help="what users give")
    p.add_argument("--threshold", type=float, default=0.5, help="thumbs: up when the oracle's score is above it")
    p.add_argument("--max-feedback", type=int, default=5000, help="stop undecided after this many feedback events")
    p.add_argument("--timeout", type=float, default=3600.0, help="stop undecided after this many seconds")
    p.add_argument("--wait-candidate", type=float, default=900.0, help="seconds to wait for a candidate in canary")
    p.add_argument("--pause", action="store_true", help="pause the learner once the candidate runs (no newer versions)")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length cap per chat")
    p.add_argument("--state-dir", default=None, help="state folder of `rlhf up` (up.json, control.token)")
    p.add_argument("--gateway", default=None, help="gateway URL (default: from up.json)")
    p.add_argument("--learner", default=None, help="learner gRPC address (default: from up.json)")
    p.add_argument("--token", default=None, help="control token (default $RLHF_CONTROL_TOKEN, else the file)")
    p.add_argument("--run-dir", default=None, help="run folder (default: $RLHF_HOME/runs/canary)")
    p.add_argument("--figure", action="store_true", help="write canary.png (matplotlib)")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class Users:
    """What the simulated users do, and what they saw."""

    gateway: str
    learner: Any  # a LearnerServiceStub
    judge: Judge
    mode: Mode = "thumbs"
    threshold: float = 0.5
    max_tokens: int = 24
    seed: int = 0
    say: Callable[[str], None] = print
    rows: list[dict[str, Any]] = field(default_factory=list)  # every rated answer
    chats: list[tuple[float, int]] = field(default_factory=list)  # (time, version) of the one-answer chats
    feedback_events: int = 0
    errors: int = 0


def canary_status(learner) -> Any:
    from rlhf.v1 import learner_pb2

    return learner.GetCanary(learner_pb2.GetCanaryRequest(), timeout=30)


def decided(learner, candidate: int) -> dict[str, Any] | None:
    """The learner's decision on `candidate`, once there is one."""
    status = canary_status(learner)
    if status.last_decision_json:
        last = json.loads(status.last_decision_json)
        if last.get("candidate") == candidate:
            return last
    return None


def run_users(
    users: Users, candidate: int, stable: int, max_feedback: int, timeout: float
) -> tuple[dict[str, Any] | None, float]:
    """Simulated users until the learner decides on `candidate` (its decision, or None) and the seconds taken."""
    import httpx

    rng = random.Random(users.seed)
    start = time.monotonic()
    decision = None
    with httpx.Client(base_url=users.gateway, timeout=120) as client:
        i = 0
        while users.feedback_events < max_feedback and time.monotonic() - start < timeout:
            i += 1
            conversation = f"canary-{users.seed}-{i}-{rng.randrange(10**9)}"
            prompt = PROMPTS[i % len(PROMPTS)]
            _one_user(users, client, conversation, prompt, candidate, stable, rng)
            if i % 5 == 0:
                decision = decided(users.learner, candidate)
                if decision is not None:
                    break
                if i % 50 == 0:
                    users.say(
                        f"[canary] {users.feedback_events} feedback events, {len(users.chats)} chats, "
                        f"candidate share {candidate_share(users.chats, candidate):.3f}"
                    )
    if decision is None:
        decision = decided(users.learner, candidate)
    return decision, time.monotonic() - start


def candidate_share(chats: list[tuple[float, int]], candidate: int) -> float:
    return sum(v == candidate for _, v in chats) / len(chats) if chats else 0.0


def _chat(client, conversation: str, prompt: str, n: int, max_tokens: int) -> dict | None:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "conversation_id": conversation,
        "n": n,
        "max_tokens": max_tokens,
    }
    r = client.post("/v1/chat/completions", json=body)
    return r.json() if r.status_code == 200 else None


def _feedback(users: Users, client, body: dict) -> None:
    r = client.post("/v1/feedback", json={**body, "source": "simulated"})
    if r.status_code == 202:
        users.feedback_events += 1
    else:
        users.errors += 1


def _one_user(users: Users, client, conversation: str, prompt: str, candidate: int, stable: int, rng) -> None:
    first = _chat(client, conversation, prompt, 1, users.max_tokens)
    if first is None:
        users.errors += 1
        return
    choice = first["choices"][0]
    version = int(choice.get("policy_version", first["policy_version"]))
    now = time.time()
    users.chats.append((now, version))
    if users.mode in ("thumbs", "mixed"):
        up = users.judge(prompt, choice["message"]["content"], version) > users.threshold
        _feedback(users, client, {"kind": "rating", "response_id": choice["response_id"], "value": 1 if up else -1})
        role = "candidate" if version == candidate else "stable" if version == stable else "other"
        users.rows.append({"time": now, "version": version, "role": role, "up": int(up)})
    if users.mode in ("pairwise", "mixed"):
        pair = _chat(client, conversation, prompt, 2, users.max_tokens)
        if pair is None:
            users.errors += 1
            return
        a, b = pair["choices"][:2]
        scores = [
            users.judge(prompt, c["message"]["content"], int(c.get("policy_version", pair["policy_version"])))
            for c in (a, b)
        ]
        if scores[0] == scores[1]:
            return  # no difference to the person: no pick
        chosen, rejected = (a, b) if scores[0] > scores[1] else (b, a)
        _feedback(
            users,
            client,
            {"kind": "comparison", "chosen_id": chosen["response_id"], "rejected_id": rejected["response_id"]},
        )


def wait_candidate(learner, timeout: float, say: Callable[[str], None]) -> Any:
    """The canary status once a candidate runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = canary_status(learner)
        if not status.enabled:
            raise RuntimeError("canaries are off on this learner: start `rlhf up` with RLHF_CANARY_ENABLED=true")
        if status.candidate_version:
            return status
        time.sleep(2.0)
    raise RuntimeError(f"no candidate in canary after {timeout:g} s (is the loop training? see `rlhf status`)")


def summary(
    users: Users, decision: dict | None, candidate: int, stable: int, share: float, seconds: float
) -> dict[str, Any]:
    during = [(t, v) for t, v in users.chats if v in (candidate, stable)]
    n = len(during)
    measured = candidate_share(during, candidate)
    return {
        "decision": decision["verdict"] if decision else "none",
        "reason": decision["reason"] if decision else "undecided",
        "candidate": candidate,
        "stable": stable,
        "feedback_events": users.feedback_events,
        "minutes": round(seconds / 60, 3),
        "max_candidate_share": round(measured, 4),
        "share": share,
        "share_limit": round(share + 3 * math.sqrt(share * (1 - share) / n), 4) if n else None,
        "chats": n,
        "errors": users.errors,
    }


def write_figure(path: Path, rows: list[dict[str, Any]], decision: dict | None, window: int = 40) -> None:
    """Thumbs-up rate per version over time (a moving window of `window` ratings each), the decision marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    t0 = rows[0]["time"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for role, colour in (("stable", "tab:blue"), ("candidate", "tab:orange")):
        mine = [r for r in rows if r["role"] == role]
        xs, ys = [], []
        for k in range(len(mine)):
            part = mine[max(0, k + 1 - window) : k + 1]
            xs.append((mine[k]["time"] - t0) / 60)
            ys.append(sum(r["up"] for r in part) / len(part))
        if xs:
            version = mine[0]["version"]
            ax.plot(xs, ys, color=colour, label=f"{role} v{version}")
    if decision is not None:
        end = (rows[-1]["time"] - t0) / 60
        ax.axvline(end, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"{decision['verdict']} ({decision['reason']})", (end, 0.95), ha="right", fontsize=8)
    ax.set_xlabel("minutes")
    ax.set_ylabel(f"thumbs-up rate (last {window} ratings)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    from rlhf.control import learner_address
    from rlhf.experiments.oracles import load_oracle
    from rlhf.launcher import read_endpoints
    from rlhf.models import rlhf_home
    from rlhf.serving.auth import control_token_from
    from rlhf.serving.client import sync_channel
    from rlhf.serving.settings import default_state_dir
    from rlhf.v1 import learner_pb2, learner_pb2_grpc

    say = lambda m: print(m, flush=True)  # noqa: E731
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    gateway = args.gateway
    if gateway is None:
        specs = read_endpoints(state) or []
        found = next((s for s in specs if s.name == "gateway"), None)
        gateway = f"http://{found.address}" if found else "http://127.0.0.1:8000"
    token = (args.token or "").strip() or control_token_from(state)
    oracle = None if args.oracle in VERSION_TASTES else load_oracle(args.oracle)
    run_dir = Path(args.run_dir or rlhf_home() / "runs" / "canary")
    run_dir.mkdir(parents=True, exist_ok=True)
    with sync_channel(learner_address(state, args.learner), control_token=token) as channel:
        learner = learner_pb2_grpc.LearnerServiceStub(channel)
        try:
            if args.share is not None:
                learner.SetCanary(learner_pb2.SetCanaryRequest(set_share=True, share=args.share), timeout=60)
            status = wait_candidate(learner, args.wait_candidate, say)
            if args.pause:
                learner.Pause(learner_pb2.PauseRequest(), timeout=600)
        except Exception as e:  # noqa: BLE001 - one line, exit 1
            print(f"rlhf experiment canary: {e}", file=sys.stderr)
            return 1
        candidate, stable, share = status.candidate_version, status.stable_version, status.share
        say(f"[canary] candidate v{candidate} against stable v{stable} at share {share:g}; gateway {gateway}")
        judge = (
            version_taste(args.oracle, candidate, stable, args.seed)
            if oracle is None
            else (lambda p, r, v: oracle(p, r))
        )
        users = Users(
            gateway,
            learner,
            judge,
            mode=args.mode,
            threshold=args.threshold,
            max_tokens=args.max_tokens,
            seed=args.seed,
            say=say,
        )
        decision, seconds = run_users(users, candidate, stable, args.max_feedback, args.timeout)
    with (run_dir / "canary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["time", "version", "role", "up"])
        writer.writeheader()
        writer.writerows(users.rows)
    if args.figure:
        write_figure(run_dir / "canary.png", users.rows, decision)
    print(json.dumps(summary(users, decision, candidate, stable, share, seconds)), flush=True)
    return 0
