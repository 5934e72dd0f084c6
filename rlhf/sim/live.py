"""`rlhf experiment win-rate`: does live feedback make the served policy better, and how
much feedback and time does it take? Against a running `rlhf up` stack:

  1. a baseline `rlhf eval` round of the policy served now (version 0 on a fresh stack:
     the reference itself, so a win-rate of about 0.5);
  2. simulated users start chatting and giving oracle feedback through the gateway (what
     `rlhf simulate` does), in a background thread, until `--feedback` events were accepted;
  3. an eval round every `--every` seconds, each row recording the minutes since the first
     feedback and the feedback events accepted so far, until the served policy's win-rate
     reaches `--target` with KL to the reference within `--kl-budget`, or `--max-minutes`.

Everything in between is the stack's own doing: the reward service trains on the feedback,
the rollout worker starts once the RM has a trained version, the learner runs PPO and the
drift gate promotes versions into the generator. Output in the run folder: eval.jsonl,
eval.png, summary.json, report.md; the last stdout line is the summary as one JSON object.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from rlhf.sim.clients import Endpoints
from rlhf.sim.evaluate import evaluate_round, plot_eval
from rlhf.sim.oracles import load_oracle
from rlhf.sim.prompts import load_prompts
from rlhf.sim.runlog import RunFolder, table
from rlhf.sim.simulate import SimStats, simulate

COLUMNS = ("minutes", "feedback", "policy_version", "win_rate", "win_rate_low", "win_rate_high", "kl_to_reference",
           "words", "words_reference", "reward", "reward_reference", "rm_version", "rm_online_accuracy",
           "learner_step")


def learner_status(ep: Endpoints) -> dict:
    """The learner's step, versions and β, for the record; {} if it does not answer."""
    import grpc

    from rlhf.serving.client import sync_channel
    from rlhf.v1 import learner_pb2, learner_pb2_grpc

    try:
        with sync_channel(ep.learner) as ch:
            st = learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(learner_pb2.GetStatusRequest(), timeout=10)
    except grpc.RpcError:
        return {}
    return {"learner_step": st.step, "learner_policy_version": st.policy_version,
            "learner_serving_version": st.serving_version, "kl_coef": st.kl_coef,
            "rollouts_trained": st.rollouts_trained}


def reached(row: dict, target: float, kl_budget: float) -> bool:
    return row["policy_version"] > 0 and row["win_rate"] >= target and row["kl_to_reference"] <= kl_budget


def report(rows: list[dict], summary: dict) -> str:
    verdict = (f"reached win-rate {summary['win_rate']:.3f} ≥ {summary['target']} with KL {summary['kl_to_reference']:.2f} "
               f"≤ {summary['kl_budget']} nats after **{summary['minutes']:.1f} min** and "
               f"**{summary['feedback_events']} feedback events**" if summary["reached"] else
               f"did not reach win-rate {summary['target']} within {summary['minutes']:.1f} min "
               f"(best {summary['best_win_rate']:.3f}); {summary['feedback_events']} feedback events")
    return "\n".join([
        "# win-rate against the reference, live loop", "",
        f"Oracle `{summary['oracle']}`; {summary['n_prompts']} held-out prompts × {summary['samples']} answers per "
        f"side; {verdict}.", "",
        table(rows, COLUMNS, markdown=True), "",
        "![eval](eval.png)", "",
    ])


def main(args) -> int:
    from rlhf.models import rlhf_home

    try:
        oracle = load_oracle(args.oracle)
        prompts = load_prompts("heldout", args.prompts)
        train_prompts = load_prompts("train", None)
    except ValueError as e:
        print(f"rlhf experiment win-rate: {e}", file=sys.stderr)
        return 2
    if args.n:
        prompts = prompts[: args.n]
    ep = Endpoints.discover(args.state_dir)
    run = RunFolder(args.run_dir or rlhf_home() / "runs" / "win-rate")
    run.write_json("config.json", {k: v for k, v in vars(args).items() if k != "fn"})
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"[win-rate] {len(prompts)} held-out prompts × {args.samples}, oracle {args.oracle}, "
        f"target {args.target} within KL {args.kl_budget}, run folder {run.root}")

    def eval_row(started: float | None, stats: SimStats) -> dict:
        row = evaluate_round(ep, oracle, prompts, args.samples, args.max_tokens, run, args.seed, None, say,
                             args.concurrency)
        row.update(oracle_name=args.oracle, feedback=stats.accepted,
                   minutes=0.0 if started is None else (time.monotonic() - started) / 60, **learner_status(ep))
        run.append("eval", row)
        plot_eval(run, args.target)
        say(f"[win-rate] {row['minutes']:.1f} min, {row['feedback']} feedback: policy v{row['policy_version']} "
            f"win-rate {row['win_rate']:.3f} [{row['win_rate_low']:.2f}, {row['win_rate_high']:.2f}] "
            f"KL {row['kl_to_reference']:.2f} nats, {row['words']:.1f} words (reference {row['words_reference']:.1f})")
        return row

    stats, stop = SimStats(), threading.Event()
    try:
        rows = [eval_row(None, stats)]
    except Exception as e:  # a stack that is down is the caller's to fix: say which call failed
        print(f"rlhf experiment win-rate: {type(e).__name__}: {getattr(e, 'details', lambda: e)()}", file=sys.stderr)
        return 1
    failure: list[BaseException] = []

    def users() -> None:
        try:
            simulate(ep.gateway, oracle, args.feedback, args.mode, train_prompts, args.users, None, None,
                     args.max_tokens, args.seed, progress=lambda m: say(m), progress_every=30, stats=stats, stop=stop)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    started = time.monotonic()
    feeder = threading.Thread(target=users, name="simulated-users", daemon=True)
    feeder.start()
    try:
        while True:
            next_at = time.monotonic() + args.every
            while time.monotonic() < next_at and not failure:
                time.sleep(1)
            if failure:
                raise failure[0]
            rows.append(eval_row(started, stats))
            if reached(rows[-1], args.target, args.kl_budget) or rows[-1]["minutes"] >= args.max_minutes:
                break
    except KeyboardInterrupt:
        say("[win-rate] interrupted")
    except Exception as e:
        print(f"rlhf experiment win-rate: {type(e).__name__}: {getattr(e, 'details', lambda: e)()}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        feeder.join(timeout=600)

    last = rows[-1]
    summary = {
        "reached": reached(last, args.target, args.kl_budget), "target": args.target, "kl_budget": args.kl_budget,
        "minutes": last["minutes"], "feedback_events": last["feedback"], "chats": stats.chats,
        "policy_version": last["policy_version"], "win_rate": last["win_rate"],
        "kl_to_reference": last["kl_to_reference"], "baseline_win_rate": rows[0]["win_rate"],
        "best_win_rate": max(r["win_rate"] for r in rows[1:]) if len(rows) > 1 else rows[0]["win_rate"],
        "oracle": args.oracle, "n_prompts": len(prompts), "samples": args.samples, "eval_rounds": len(rows),
    }
    run.write_json("summary.json", summary)
    run.path("report.md").write_text(report(rows, summary))
    print()
    print(table(rows, COLUMNS))
    print(f"\nplots: {run.path('eval.png')}   report: {run.path('report.md')}")
    print(json.dumps(summary))
    return 0 if summary["reached"] else 3
