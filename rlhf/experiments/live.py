"""`rlhf experiment win-rate`: does live feedback make the served policy better, and how
much feedback and time does it take? Against a running `rlhf up` stack:

  1. a baseline `rlhf eval` round of the policy served now (version 0 on a fresh stack:
     the reference itself, so a win-rate of about 0.5);
  2. simulated users start chatting and giving oracle feedback through the gateway (what
     `rlhf simulate` does), in a background thread, until `--feedback` events were accepted;
  3. an eval round every `--every` seconds, each row recording the minutes since the first
     feedback and the feedback events accepted so far, until the served policy's win-rate
     reaches `--target` with KL to the reference within `--kl-budget`, or `--max-minutes`.
     During a round the loop stands still (`--freeze`, the default; LoopFreeze): the users
     hold and the learner pauses, so the round measures one version on cores of its own,
     and `minutes` counts the loop's time only (`wall_minutes` includes the rounds).

With `--objective NAME` (ppo, grpo, rloo, online_dpo, best_of_n; `--distill best_of_n` beside
ppo/grpo/rloo) the experiment starts its own fresh `rlhf up` in <run-dir>/state with that
learner objective (every other setting from the environment, as `rlhf up` reads it; flags
for `rlhf up` itself by `--up-arg`), and stops it at the end: one command per row of a
comparison, from the same fresh start each time.

Everything in between is the stack's own doing: the reward service trains on the feedback,
the rollout worker starts once the RM has a trained version, the learner runs PPO and the
drift gate promotes versions into the generator. Output in the run folder: eval.jsonl,
eval.png, summary.json, report.md; the last stdout line is the summary as one JSON object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf.experiments.clients import Endpoints
from rlhf.experiments.clients import failure as describe
from rlhf.experiments.evaluate import evaluate_round, plot_eval
from rlhf.experiments.oracles import load_oracle
from rlhf.experiments.runlog import RunFolder, table
from rlhf.experiments.simulate import SimStats, simulate
from rlhf.prompts import load_prompt_texts

COLUMNS = (
    "minutes",
    "wall_minutes",
    "feedback",
    "policy_version",
    "win_rate",
    "win_rate_low",
    "win_rate_high",
    "kl_to_reference",
    "property_rate",
    "property_rate_reference",
    "words",
    "words_reference",
    "reward",
    "reward_reference",
    "rm_version",
    "rm_online_accuracy",
    "learner_step",
)


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
    return {
        "learner_step": st.step,
        "learner_policy_version": st.policy_version,
        "learner_serving_version": st.serving_version,
        "kl_coef": st.kl_coef,
        "rollouts_trained": st.rollouts_trained,
    }


PAUSE_TIMEOUT_S = 900  # Pause returns once the PPO step in flight has ended: minutes for 135M on 2 cores


class LoopFreeze:
    """Holds the loop still while an eval round measures the served version: the simulated
    users start no new chat (`hold`) and the learner pauses after the step in flight (its
    Pause RPC, with the control token), so no version is promoted mid-round and the round
    has the cores to itself; `thaw` resumes both. A learner an operator had paused is left
    paused. The rollout worker may still finish the rollouts its budget allows, and the
    reward model trains on feedback already sent. Failures are loud: a learner that cannot
    be paused raises, naming what to fix."""

    def __init__(self, ep: Endpoints, state_dir: Path):
        from rlhf.serving.auth import control_token_from

        self.address = ep.learner
        self.token = control_token_from(state_dir)
        self.hold = threading.Event()
        self._paused_by_us = False

    def _call(self, name: str, timeout: float):
        import grpc

        from rlhf.serving.client import sync_channel
        from rlhf.v1 import learner_pb2, learner_pb2_grpc

        request = {"Pause": learner_pb2.PauseRequest, "Resume": learner_pb2.ResumeRequest}[name]()
        with sync_channel(self.address, control_token=self.token) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            try:
                if stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=30).paused and name == "Pause":
                    return False  # an operator's pause: theirs to lift
                getattr(stub, name)(request, timeout=timeout)
            except grpc.RpcError as e:
                raise RuntimeError(
                    f"{name} of the learner at {self.address} failed ({e.code().name}: {e.details()}); "
                    "the eval freeze needs the control token (RLHF_CONTROL_TOKEN or <state-dir>/control.token), "
                    "or pass --no-freeze"
                ) from e
        return True

    def freeze(self) -> float:
        """Users held, learner paused; returns the seconds the pause took (the step in flight)."""
        t0 = time.monotonic()
        self.hold.set()
        self._paused_by_us = self._call("Pause", PAUSE_TIMEOUT_S)
        return time.monotonic() - t0

    def thaw(self) -> None:
        try:
            if self._paused_by_us:
                self._call("Resume", 60)
                self._paused_by_us = False
        finally:
            self.hold.clear()


STACK_START_TIMEOUT_S = 900  # the 135M stack on 2 cores takes ~1.5 min; a first model download longer


@contextmanager
def fresh_stack(root: Path, objective: str, distill: str | None, up_args: list[str], say) -> Iterator[Path]:
    """`rlhf up` on a new state folder <root>/state with the learner's objective (and
    distillation) set; yields the state folder once every service is SERVING; SIGTERM at
    the end (SIGKILL after 120 s). Its output goes to <root>/up.log. A SIGTERM to this
    process ends the experiment the same way (SystemExit), so the stack never outlives it."""
    state = root / "state"
    if state.exists() and any(state.iterdir()):
        raise ValueError(f"{state} is not empty: a fresh stack needs a new --run-dir (or remove that folder)")
    env = {**os.environ, "RLHF_LEARNER_OBJECTIVE": objective, "PYTHONUNBUFFERED": "1"}
    if distill:
        env["RLHF_LEARNER_DISTILL"] = distill
    log_path = root / "up.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.cli", "up", "--state-dir", str(state), *up_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    say(
        f"[win-rate] starting a fresh stack, learner objective {objective}"
        f"{f' + distill {distill}' if distill else ''} (log: {log_path})"
    )
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        deadline = time.monotonic() + STACK_START_TIMEOUT_S
        while "all services SERVING" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"rlhf up exited with code {proc.returncode} before serving:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rlhf up not SERVING after {STACK_START_TIMEOUT_S} s (log: {log_path})")
            time.sleep(2)
        yield state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if main:
            signal.signal(signal.SIGTERM, previous)
        say(f"[win-rate] stack stopped (exit code {proc.returncode})")


def _exit_on_sigterm(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


def stack_settings(profile: str | None = None) -> dict[str, str]:
    """The RLHF_* environment the stack runs with, for the run's config.json: what is
    exported here, plus — for a stack this experiment started (`profile` = its `rlhf up
    --profile`) — what the machine profile gave the services (rlhf/profile.py)."""
    from rlhf.profile import resolve

    env = dict(os.environ)
    if profile is not None:
        env.update(resolve(profile).split(os.environ)[0])
    return {k: v for k, v in sorted(env.items()) if k.startswith("RLHF_") and "TOKEN" not in k and "KEY" not in k}


def profile_of(up_args: list[str]) -> str:
    """The `--profile` value among `rlhf up` arguments ("auto" when absent)."""
    for i, a in enumerate(up_args):
        if a.startswith("--profile="):
            return a.split("=", 1)[1]
        if a == "--profile" and i + 1 < len(up_args):
            return up_args[i + 1]
    return "auto"


def reached(row: dict, target: float, kl_budget: float) -> bool:
    return row["policy_version"] > 0 and row["win_rate"] >= target and row["kl_to_reference"] <= kl_budget


def report(rows: list[dict], summary: dict) -> str:
    verdict = (
        f"reached win-rate {summary['win_rate']:.3f} ≥ {summary['target']} with KL {summary['kl_to_reference']:.2f} "
        f"≤ {summary['kl_budget']} nats after **{summary['minutes']:.1f} min** and "
        f"**{summary['feedback_events']} feedback events**"
        if summary["reached"]
        else f"did not reach win-rate {summary['target']} within {summary['minutes']:.1f} min "
        f"(best {summary['best_win_rate']:.3f}); {summary['feedback_events']} feedback events"
    )
    return "\n".join(
        [
            "# win-rate against the reference, live loop",
            "",
            f"Oracle `{summary['oracle']}`; {summary['n_prompts']} held-out prompts × {summary['samples']} answers per "
            f"side; {verdict}.",
            "",
            (
                f"Minutes are the loop's own: it stood still during the eval rounds ({summary['wall_minutes']:.1f} "
                "min wall-clock to the last row)."
                if summary["freeze"]
                else "Minutes are wall-clock; the eval rounds shared the machine with the running loop."
            ),
            "",
            table(rows, COLUMNS, markdown=True),
            "",
            "![eval](eval.png)",
            "",
        ]
    )


def main(args) -> int:
    from rlhf.models import rlhf_home

    objective = getattr(args, "objective", None)
    if objective is None:
        if getattr(args, "distill", None) or getattr(args, "up_arg", None):
            print(
                "rlhf experiment win-rate: --distill and --up-arg configure the fresh stack that --objective "
                "starts; give --objective too",
                file=sys.stderr,
            )
            return 2
        return run(args)
    if args.state_dir:
        print(
            "rlhf experiment win-rate: --objective starts a fresh stack of its own; drop --state-dir "
            "(or drop --objective to run against the stack in --state-dir)",
            file=sys.stderr,
        )
        return 2
    root = Path(args.run_dir or rlhf_home() / "runs" / "win-rate")
    root.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        with fresh_stack(root, objective, args.distill, list(args.up_arg or []), say) as state:
            args.state_dir, args.run_dir = str(state), str(root)
            return run(args, profile=profile_of(list(args.up_arg or [])))
    except (ValueError, RuntimeError) as e:
        print(f"rlhf experiment win-rate: {e}", file=sys.stderr)
        return 1


def run(args, profile: str | None = None) -> int:
    """The experiment against the stack in args.state_dir; `profile`: the `rlhf up --profile`
    of a stack main() started (recorded in config.json), None for one started elsewhere."""
    from rlhf.models import rlhf_home
    from rlhf.serving.settings import default_state_dir

    try:
        oracle = load_oracle(args.oracle)
        prompts = load_prompt_texts("heldout", args.prompts)
        train_prompts = load_prompt_texts("train", None)
    except ValueError as e:
        print(f"rlhf experiment win-rate: {e}", file=sys.stderr)
        return 2
    if args.n:
        prompts = prompts[: args.n]
    ep = Endpoints.discover(args.state_dir)
    run = RunFolder(args.run_dir or rlhf_home() / "runs" / "win-rate")
    run.write_json(
        "config.json", {**{k: v for k, v in vars(args).items() if k != "fn"}, "stack_settings": stack_settings(profile)}
    )
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(
        f"[win-rate] {len(prompts)} held-out prompts × {args.samples}, oracle {args.oracle}, "
        f"target {args.target} within KL {args.kl_budget}, run folder {run.root}"
    )

    freeze = LoopFreeze(ep, Path(args.state_dir) if args.state_dir else default_state_dir())
    frozen_s = 0.0  # seconds the loop stood still for eval rounds: not counted in `minutes`

    def eval_row(started: float | None, stats: SimStats) -> dict:
        nonlocal frozen_s
        frozen = started is not None and args.freeze
        if frozen:
            say("[win-rate] freezing the loop for the eval round (users held, learner paused after its step)")
            freeze.freeze()  # the step in flight ends first: loop time
        t0 = time.monotonic()
        loop_minutes = 0.0 if started is None else (t0 - started - frozen_s) / 60
        try:
            row = evaluate_round(
                ep, oracle, prompts, args.samples, args.max_tokens, run, args.seed, None, say, args.concurrency
            )
            row.update(
                oracle_name=args.oracle,
                feedback=stats.accepted,
                minutes=loop_minutes,
                wall_minutes=0.0 if started is None else (t0 - started) / 60,
                eval_seconds=time.monotonic() - t0,
                frozen=frozen,
                **learner_status(ep),
            )
        finally:
            if frozen:
                freeze.thaw()
                frozen_s += time.monotonic() - t0
        run.append("eval", row)
        plot_eval(run, args.target)
        say(
            f"[win-rate] {row['minutes']:.1f} min, {row['feedback']} feedback: policy v{row['policy_version']} "
            f"win-rate {row['win_rate']:.3f} [{row['win_rate_low']:.2f}, {row['win_rate_high']:.2f}] "
            f"KL {row['kl_to_reference']:.2f} nats, {row['words']:.1f} words (reference {row['words_reference']:.1f})"
        )
        return row

    stats, stop = SimStats(), threading.Event()
    try:
        rows = [eval_row(None, stats)]
    except Exception as e:  # noqa: BLE001 - a stack that is down is the caller's to fix: say which call failed
        print(f"rlhf experiment win-rate: {describe(e)}", file=sys.stderr)
        return 1
    failure: list[BaseException] = []

    def users() -> None:
        try:
            simulate(
                ep.gateway,
                oracle,
                args.feedback,
                args.mode,
                train_prompts,
                args.users,
                None,
                None,
                args.max_tokens,
                args.seed,
                progress=lambda m: say(m),
                progress_every=30,
                stats=stats,
                stop=stop,
                hold=freeze.hold,
            )
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
    except Exception as e:  # noqa: BLE001 - any failure mid-run (here or in the simulator) is reported, not raised
        print(f"rlhf experiment win-rate: {describe(e)}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        feeder.join(timeout=600)

    last = rows[-1]
    summary = {
        "reached": reached(last, args.target, args.kl_budget),
        "target": args.target,
        "kl_budget": args.kl_budget,
        "minutes": last["minutes"],
        "wall_minutes": last["wall_minutes"],
        "freeze": bool(args.freeze),
        "feedback_events": last["feedback"],
        "chats": stats.chats,
        "policy_version": last["policy_version"],
        "win_rate": last["win_rate"],
        "kl_to_reference": last["kl_to_reference"],
        "baseline_win_rate": rows[0]["win_rate"],
        "best_win_rate": max(r["win_rate"] for r in rows[1:]) if len(rows) > 1 else rows[0]["win_rate"],
        "oracle": args.oracle,
        "n_prompts": len(prompts),
        "samples": args.samples,
        "eval_rounds": len(rows),
        "objective": getattr(args, "objective", None),
        "distill": getattr(args, "distill", None),
        **(
            {"property_rate": last["property_rate"], "base_rate": rows[0]["property_rate_reference"]}
            if "property_rate" in last
            else {}
        ),
    }
    run.write_json("summary.json", summary)
    run.path("report.md").write_text(report(rows, summary))
    print()
    print(table(rows, COLUMNS))
    print(f"\nplots: {run.path('eval.png')}   report: {run.path('report.md')}")
    print(json.dumps(summary))
    return 0 if summary["reached"] else 3
