"""Flags of `rlhf simulate`, `rlhf eval` and `rlhf experiment kl-sweep|win-rate|base-rates`. Nothing heavy is
imported here: the parser is built on every `rlhf` call."""

from __future__ import annotations

import argparse

from rlhf.experiments.sweep_config import add_arguments as kl_sweep_arguments

__all__ = ["base_rates_arguments", "eval_arguments", "kl_sweep_arguments", "simulate_arguments", "win_rate_arguments"]


def base_rates_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model folder or hub id (default: the demo model, SmolLM2-135M)")
    p.add_argument(
        "--oracle",
        action="append",
        default=None,
        help="module:function whose `property` to measure too (repeat); the built-in ones always are",
    )
    p.add_argument("--prompts", default=None, help="prompt file (.txt or .jsonl); default: the held-out split")
    p.add_argument("--n", type=int, default=None, help="first N prompts only (default: all)")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length cap (what the rollouts and eval use)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts sampled together")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype for sampling")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--run-dir", default=None, help="run folder (default: $RLHF_HOME/runs/base-rates)")
    p.add_argument("--seed", type=int, default=0)


def simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", required=True, help="module:function (prompt, response) -> float, or a built-in name")
    p.add_argument("--feedback", type=int, required=True, help="return once this many feedback events were accepted")
    p.add_argument(
        "--mode",
        choices=("pairwise", "thumbs", "mixed"),
        default="pairwise",
        help="pairwise: two answers, the better one chosen; thumbs: one answer rated; mixed: alternate",
    )
    p.add_argument("--prompts", default=None, help="prompt file (.txt or .jsonl); default: the training prompt set")
    p.add_argument("--concurrency", type=int, default=2, help="simulated users at once")
    p.add_argument(
        "--threshold", type=float, default=None, help="thumbs up above this oracle score (default: running median)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="answer length cap per chat")
    p.add_argument("--gateway", default=None, help="gateway URL (default: from up.json, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="gateway API key, if it asks for one")
    p.add_argument("--state-dir", default=None, help="state folder of `rlhf up` (for up.json)")
    p.add_argument("--seed", type=int, default=0)


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", required=True, help="module:function (prompt, response) -> float, or a built-in name")
    p.add_argument("--prompts", default=None, help="held-out prompt file (.txt or .jsonl); default: the held-out split")
    p.add_argument("--n", type=int, default=None, help="number of prompts (default: all of the held-out set)")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt on each side")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length cap, both sides")
    p.add_argument("--run-dir", default=None, help="run folder to append to (default: $RLHF_HOME/runs/eval)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="Generate requests in flight at once (the generator batches them)"
    )
    p.add_argument("--rounds", type=int, default=1, help="evaluate this many times ...")
    p.add_argument("--every", type=float, default=60.0, help="... this many seconds apart")
    p.add_argument(
        "--reference-model", default=None, help="reference model folder (default: what the reference service serves)"
    )
    p.add_argument("--state-dir", default=None, help="state folder of `rlhf up` (for up.json)")
    for name in ("generator", "reference", "reward"):
        p.add_argument(f"--{name}", default=None, help=f"{name} gRPC address (default: from up.json)")
    p.add_argument("--seed", type=int, default=0)


def win_rate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", required=True, help="module:function (prompt, response) -> float, or a built-in name")
    p.add_argument("--feedback", type=int, default=1000, help="simulated users stop after this many feedback events")
    p.add_argument(
        "--mode", choices=("pairwise", "thumbs", "mixed"), default="pairwise", help="feedback kind, as in simulate"
    )
    p.add_argument("--users", type=int, default=8, help="simulated users chatting at once")
    p.add_argument("--target", type=float, default=0.7, help="stop once the served policy's win-rate reaches this ...")
    p.add_argument(
        "--kl-budget", type=float, default=5.0, help="... with KL to the reference (nats per answer) at most this"
    )
    p.add_argument("--max-minutes", type=float, default=30.0, help="... or after this long since the first feedback")
    p.add_argument("--every", type=float, default=180.0, help="seconds between eval rounds")
    p.add_argument(
        "--freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold the users and pause the learner during each eval round, so it measures one version on "
        "free cores; `minutes` then counts loop time only (wall_minutes beside it). --no-freeze: evals "
        "share the machine with the running loop",
    )
    p.add_argument("--prompts", default=None, help="held-out prompt file (.txt or .jsonl); default: the held-out split")
    p.add_argument("--n", type=int, default=None, help="first N held-out prompts only (default: all)")
    p.add_argument("--samples", type=int, default=2, help="answers per held-out prompt on each side")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length cap: simulated chats and eval alike")
    p.add_argument("--concurrency", type=int, default=8, help="eval Generate requests in flight at once")
    p.add_argument("--run-dir", default=None, help="run folder (default: $RLHF_HOME/runs/win-rate)")
    p.add_argument("--state-dir", default=None, help="state folder of `rlhf up` (for up.json)")
    p.add_argument(
        "--objective",
        default=None,
        choices=("ppo", "grpo", "rloo", "online_dpo", "best_of_n"),
        help="start a fresh `rlhf up` in <run-dir>/state with this learner objective, stop it at the end "
        "(default: run against the stack in --state-dir)",
    )
    p.add_argument(
        "--distill",
        default=None,
        choices=("none", "best_of_n"),
        help="with --objective: the learner's distill setting (best_of_n beside ppo/grpo/rloo)",
    )
    p.add_argument(
        "--up-arg",
        action="append",
        default=None,
        help="with --objective: one more flag for `rlhf up` (repeat; e.g. --up-arg=--tiny)",
    )
    p.add_argument("--seed", type=int, default=0)
