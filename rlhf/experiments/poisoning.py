"""`rlhf experiment poisoning`: does rater reliability protect the reward model from
adversarial raters?

What runs:
  1. answers: `--answers` chats per prompt through the gateway (tiny or demo generator
     behind it), each with its own length cap, so the answers to one prompt differ; every
     pair of them is an item; the items of `--held-out-prompts` other prompts are held out
  2. feedback: `--raters` simulated raters, `--fraction` of them adversaries, each with its
     own identity (the gateway's trusted rater header); every training item is judged by
     `--raters-per-item` of them, through POST /v1/feedback: honest raters choose by the
     oracle (a tie when it scores both the same), adversaries by the adversary function
  3. the accepted events are read back through GET /v1/feedback (the export) and train the
     reward model twice, with the reward service's own trainer (rlhf.reward.trainer) on
     the tiny RM backbone: once with rater reliability on (weights and quarantine), once
     off, on the same events in the same order
  4. RM accuracy on the held-out items' honest (oracle) labels; which raters the defended
     run quarantined

The RM runs in this process, not in a reward service: two arms per fraction on identical
events need two independent trainers, and the reward service's Kafka and checkpoint
plumbing adds nothing to the comparison. The policy's win-rate is not measured here (no
learner runs): the JSON says `"policy_win_rate": null`.

Without `--gateway`, a generator and a gateway are started in the run folder (the gateway
with a trusted rater header and an export key, no Kafka needed: feedback waits in its outbox).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from rlhf.experiments.adversaries import Adversary, Choice, load_adversary
from rlhf.experiments.oracles import Oracle, load_oracle

if TYPE_CHECKING:
    import httpx

RATER_HEADER = "x-rater-id"


@dataclass(frozen=True)
class Item:
    """Two answers to one prompt, as the gateway served them, and the honest choice."""

    prompt: str
    a_id: str
    a: str
    b_id: str
    b: str
    honest: Choice  # 0 = a, 1 = b, None = tie (the oracle scores them the same)


# ---- a gateway to talk to ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: see {log}")
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s: see {log}")


@contextmanager
def local_gateway(run_dir: Path, model: str, max_tokens: int, timeout: float = 300) -> Iterator[tuple[str, str]]:
    """A generator (transformers backend) and a gateway in front of it, as subprocesses;
    yields (gateway URL, export key). The gateway trusts RATER_HEADER and needs no Kafka."""
    from rlhf.serving.client import check_health

    run_dir.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from rlhf.models import build_tiny_model

        folder = run_dir / "tiny-model"
        model = str(folder if (folder / "config.json").exists() else build_tiny_model(folder, seed=0))
    gen_port, http_port, key = _free_port(), _free_port(), secrets.token_urlsafe(16)
    base = {**os.environ, "RLHF_STATE_DIR": str(run_dir / "state"), "RLHF_METRICS_PORT": "0"}
    gen_env = {
        **base,
        "RLHF_MODEL": model,
        "RLHF_BACKEND": "transformers",
        "RLHF_PORT": str(gen_port),
        "RLHF_FOLLOW_POLICY_UPDATES": "false",
    }
    gw_env = {
        **base,
        "RLHF_GENERATOR_ADDR": f"127.0.0.1:{gen_port}",
        "RLHF_HTTP_PORT": str(http_port),
        "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{_free_port()}",  # none: the outbox keeps the events
        "RLHF_RATER_HEADER": RATER_HEADER,
        "RLHF_FEEDBACK_EXPORT_KEYS": key,
        "RLHF_DEFAULT_MAX_COMPLETION_TOKENS": str(max_tokens),
    }
    url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    with ExitStack() as stack:
        for name, env, check in (
            ("generator", gen_env, lambda: check_health(f"127.0.0.1:{gen_port}", timeout=1) == "SERVING"),
            ("gateway", gw_env, ready),
        ):
            log = run_dir / f"{name}.log"
            out = stack.enter_context(open(log, "ab"))
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
            stack.callback(_stop, proc)
            _wait(check, proc, name, log, timeout)
        yield url, key


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- answers, feedback, export ------------------------------------------------------------


def _post(http: "httpx.Client", path: str, body: dict, headers: dict | None = None) -> dict:
    import httpx

    delay = 0.5
    for attempt in range(6):
        try:
            r = http.post(path, json=body, headers=headers)
        except httpx.TransportError:
            if attempt == 5:
                raise
        else:
            if r.status_code < 300:
                return r.json()
            if r.status_code not in (429, 502, 503, 504) or attempt == 5:
                raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text[:300]}")
        time.sleep(delay)
        delay = min(2 * delay, 8)
    raise AssertionError("unreachable")


def collect_items(
    url: str,
    prompts: Sequence[str],
    oracle: Oracle,
    n_prompts: int,
    per_prompt: int,
    rng: random.Random,
    max_tokens: int,
    concurrency: int = 4,
) -> list[list[Item]]:
    """Per prompt (n_prompts distinct ones), `per_prompt` chats with different length caps
    (2..max_tokens) and every pair of their answers as an item: one list per prompt."""
    import httpx

    chosen = rng.sample(list(prompts), min(n_prompts, len(prompts)))
    caps = [rng.sample(range(2, max(max_tokens, per_prompt + 1) + 1), per_prompt) for _ in chosen]

    def one(i: int) -> list[Item]:
        with httpx.Client(base_url=url, timeout=300) as http:
            answers = []
            for cap in caps[i]:
                body = {"messages": [{"role": "user", "content": chosen[i]}], "max_tokens": cap, "n": 1}
                choice = _post(http, "/v1/chat/completions", body)["choices"][0]
                answers.append((choice["response_id"], choice["message"]["content"]))
        items = []
        for x in range(len(answers)):
            for y in range(x + 1, len(answers)):
                (a_id, a), (b_id, b) = answers[x], answers[y]
                sa, sb = oracle(chosen[i], a), oracle(chosen[i], b)
                items.append(Item(chosen[i], a_id, a, b_id, b, None if sa == sb else (0 if sa > sb else 1)))
        return items

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(chosen))))


def give_feedback(
    url: str,
    items: Sequence[Item],
    raters: Sequence[tuple[str, Adversary | None]],
    per_item: int,
    rng: random.Random,
    concurrency: int = 4,
) -> tuple[int, int, int]:
    """Every item judged by `per_item` distinct raters through POST /v1/feedback; returns
    (first ms, end ms, events accepted)."""
    jobs = []
    for item in items:
        for rater, adversary in rng.sample(list(raters), per_item):
            choice = item.honest if adversary is None else adversary(item.prompt, item.a, item.b, item.honest)
            jobs.append((item, rater, choice))
    rng.shuffle(jobs)
    t0 = int(time.time() * 1000)
    import httpx

    def one(job) -> int:
        item, rater, choice = job
        first, second = (item.a_id, item.b_id) if choice in (0, None) else (item.b_id, item.a_id)
        body = {
            "kind": "comparison",
            "chosen_id": first,
            "rejected_id": second,
            "outcome": "tie" if choice is None else "chosen",
            "source": "simulated",
            "tags": ["poisoning"],
        }
        with httpx.Client(base_url=url, timeout=60) as http:
            _post(http, "/v1/feedback", body, {RATER_HEADER: rater})
        return 1

    with ThreadPoolExecutor(concurrency) as pool:
        accepted = sum(pool.map(one, jobs))
    return t0, int(time.time() * 1000) + 1, accepted


def export(url: str, key: str, since_ms: int, until_ms: int, page: int = 500) -> list:
    """The feedback events of [since_ms, until_ms) through GET /v1/feedback, every page."""
    import httpx
    from google.protobuf.json_format import ParseDict

    from rlhf.v1 import events_pb2

    out, cursor = [], 0
    with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {key}"}) as http:
        while True:
            params = {"since_ms": since_ms, "until_ms": until_ms, "cursor": cursor, "limit": page}
            r = http.get("/v1/feedback", params=params)
            if r.status_code != 200:
                raise RuntimeError(f"GET /v1/feedback: HTTP {r.status_code}: {r.text[:300]}")
            body = r.json()
            for row in body["data"]:
                row.pop("superseded_by", None)
                out.append(ParseDict(row, events_pb2.Feedback()))
            if body["next_cursor"] is None:
                return out
            cursor = body["next_cursor"]


# ---- the reward model ---------------------------------------------------------------------


def train_rm(events: Sequence, defended: bool, seed: int, rm_args: dict, label_noise: float = 0.0):
    """The reward service's trainer on `events` in order (the noise-aware Bradley-Terry
    with `label_noise` ε > 0); returns it."""
    import torch

    from rlhf.reward import OnlineRewardTrainer, load_reward_model, resolve_backbone
    from rlhf.reward.config import TrainerConfig
    from rlhf.reward.reliability import ReliabilityConfig

    torch.manual_seed(seed)
    spec = resolve_backbone(rm_args.get("backbone", "tiny"))
    model = load_reward_model(spec, max_tokens=rm_args.get("max_tokens", 64), head_seed=seed)
    cfg = TrainerConfig(
        lr=rm_args.get("lr", 1e-3), train_batch_size=rm_args.get("batch_size", 16), seed=seed, label_noise=label_noise
    )
    trainer = OnlineRewardTrainer(model, cfg, ReliabilityConfig(enabled=defended))
    ingested = trainer.ingest(events)
    for _ in trainer.train(ingested.examples):
        pass
    return trainer


def held_out_accuracy(model, items: Sequence[Item]) -> float:
    """Share of held-out items with an honest preference whose preferred answer the RM scores higher."""
    decided = [it for it in items if it.honest is not None]
    if not decided:
        return float("nan")
    prompts = [(("user", it.prompt),) for it in decided]
    sa = model.score(prompts, [it.a for it in decided])
    sb = model.score(prompts, [it.b for it in decided])
    right = [(a > b) if it.honest == 0 else (b > a) for it, a, b in zip(decided, sa.tolist(), sb.tolist())]
    return sum(right) / len(right)


def _answers(group: Sequence[Item]) -> list[str]:
    """The distinct answers of one prompt's items, in order."""
    return list(({it.a_id: it.a for it in group} | {it.b_id: it.b for it in group}).values())


def _win_vs_random(prompt: str, pick: str, texts: Sequence[str], oracle: Oracle) -> float:
    """Oracle win-rate of `pick` against a uniformly random one of `texts` (a tie counts ½)."""
    best = oracle(prompt, pick)
    others = [oracle(prompt, t) for t in texts]
    return sum(1.0 if best > o else 0.5 if best == o else 0.0 for o in others) / len(others)


def best_of_n_win_rate(model, groups: Sequence[Sequence[Item]], oracle: Oracle) -> float:
    """The win-rate of the RM's best-of-n policy (Gao et al. 2023, "Scaling Laws for Reward
    Model Overoptimization": best-of-n against an RM is the policy the RM induces without a
    learner): per held-out prompt the RM picks the best of its n answers, judged by the
    honest oracle against a uniformly random one of the same n (a tie, or the same answer,
    counts ½). A random pick scores 0.5; the oracle's own pick, the ceiling for these answers."""
    wins = []
    for group in groups:
        texts = _answers(group)
        if len(texts) < 2:
            continue
        prompt = group[0].prompt
        scores = model.score([(("user", prompt),)] * len(texts), texts).tolist()
        wins.append(_win_vs_random(prompt, texts[max(range(len(texts)), key=scores.__getitem__)], texts, oracle))
    return sum(wins) / len(wins) if wins else float("nan")


def oracle_best_of_n_win_rate(groups: Sequence[Sequence[Item]], oracle: Oracle) -> float:
    """The same win-rate with the oracle itself picking: the ceiling for these answers."""
    wins = []
    for group in groups:
        texts = _answers(group)
        if len(texts) >= 2:
            prompt = group[0].prompt
            wins.append(_win_vs_random(prompt, max(texts, key=lambda t: oracle(prompt, t)), texts, oracle))
    return sum(wins) / len(wins) if wins else float("nan")


# ---- one fraction, and the command ----------------------------------------------------------


def run_fraction(
    url: str,
    key: str,
    train_items: Sequence[Item],
    held: Sequence[Item],
    fraction: float,
    adversary: Adversary,
    n_raters: int,
    per_item: int,
    seed: int,
    rm_args: dict,
    tag: str,
    progress=print,
    oracle: Oracle | None = None,
    held_groups: Sequence[Sequence[Item]] = (),
    label_noise: float = 0.0,
) -> dict:
    """One adversary share: feedback through the gateway, then the RM trained on the same
    events per arm: defended / undefended, and with `label_noise` > 0 the same two with
    the noise-aware Bradley-Terry (`noise_defended`, `noise_undefended`). With an oracle
    and held-out groups, each arm's best-of-n win-rate too."""
    rng = random.Random(seed)
    n_adv = round(fraction * n_raters)
    ids = [f"{tag}-rater-{i:02d}" for i in range(n_raters)]
    adversaries = set(rng.sample(ids, n_adv))
    raters = [(r, adversary if r in adversaries else None) for r in ids]
    t0 = time.monotonic()
    since, until, accepted = give_feedback(url, train_items, raters, per_item, rng)
    posted = time.monotonic() - t0
    events = export(url, key, since, until)
    events = [e for e in events if e.rater_id.startswith(f"header:{tag}-")]
    progress(
        f"[poisoning] fraction {fraction:g}: {accepted} feedback events accepted in {posted:.0f}s, "
        f"{len(events)} exported"
    )
    result = {"fraction": fraction, "adversaries": n_adv, "raters": n_raters, "events": len(events)}
    arms = [("defended", True, 0.0), ("undefended", False, 0.0)]
    if label_noise > 0:
        arms += [("noise_defended", True, label_noise), ("noise_undefended", False, label_noise)]
        result["label_noise"] = label_noise
    for arm, defended, eps in arms:
        t0 = time.monotonic()
        trainer = train_rm(events, defended, seed, rm_args, label_noise=eps)
        result[f"train_seconds_{arm}"] = round(time.monotonic() - t0, 1)
        result[f"accuracy_{arm}"] = held_out_accuracy(trainer.model, held)
        if oracle is not None and held_groups:
            result[f"policy_win_rate_best_of_n_{arm}"] = best_of_n_win_rate(trainer.model, held_groups, oracle)
        if defended:
            q = {r.removeprefix("header:") for r in trainer.reliability.quarantined}
            honest = set(ids) - adversaries
            result["quarantined_adversaries"] = len(q & adversaries) / n_adv if n_adv else 0.0
            result["quarantined_honest"] = len(q & honest) / len(honest) if honest else 0.0
            result["rater_accuracy"] = {
                r.removeprefix("header:"): round(p, 3) for r, p in sorted(trainer.reliability.accuracy.items())
            }
        win = result.get(f"policy_win_rate_best_of_n_{arm}")
        progress(
            f"[poisoning] fraction {fraction:g} {arm}: held-out accuracy {result[f'accuracy_{arm}']:.3f}"
            + ("" if win is None else f", best-of-n win-rate {win:.3f}")
        )
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["fraction"])
    xs = [r["fraction"] for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, [r["accuracy_defended"] for r in results], "o-", label="reliability on (defended)")
    ax.plot(xs, [r["accuracy_undefended"] for r in results], "s--", label="reliability off")
    for arm, style, label in (
        ("noise_defended", "^-", "noise-aware BT, reliability on"),
        ("noise_undefended", "v:", "noise-aware BT, reliability off"),
    ):
        pts = [(r["fraction"], r[f"accuracy_{arm}"]) for r in results if f"accuracy_{arm}" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xlabel("share of adversarial raters")
    ax.set_ylabel("RM held-out accuracy (honest labels)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--oracle", default="prefers_concise", help="honest raters' taste: module:function or built-in")
    p.add_argument("--adversary", default="flip", help="module:function (prompt, a, b, honest_choice) -> choice")
    p.add_argument("--fraction", type=float, default=0.25, help="share of raters who are adversaries")
    p.add_argument(
        "--fractions", default=None, help="comma-separated shares to sweep as well (e.g. 0,0.1,0.25,0.4): the plot"
    )
    p.add_argument("--raters", type=int, default=20, help="simulated raters")
    p.add_argument("--raters-per-item", type=int, default=3, help="raters who judge each training item")
    p.add_argument("--prompts", type=int, default=40, help="training prompts")
    p.add_argument("--held-out-prompts", type=int, default=20, help="held-out prompts for the accuracy")
    p.add_argument(
        "--answers", type=int, default=5, help="answers per prompt (chats with different length caps); items: all pairs"
    )
    p.add_argument("--max-tokens", type=int, default=24, help="answers' length caps are drawn from 2..this")
    p.add_argument(
        "--gateway", default=None, help="gateway URL (it must trust the x-rater-id header); default: start one"
    )
    p.add_argument(
        "--export-key", default=None, help="a feedback_export_keys key of --gateway ($RLHF_FEEDBACK_EXPORT_KEY)"
    )
    p.add_argument("--model", default="tiny", help='policy for the started generator: "tiny", "demo" or a folder')
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--rm-batch-size", type=int, default=16)
    p.add_argument("--run-dir", default=None, help="run folder (default: $RLHF_HOME/runs/poisoning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="also train with the noise-aware Bradley-Terry, flip probability ε (e.g. 0.25), defence on and off",
    )
    p.add_argument(
        "--label-noise-fractions",
        default=None,
        help="comma-separated shares that get the --label-noise arms (default: every share)",
    )


def main(args) -> int:
    from rlhf.models import rlhf_home, set_torch_threads
    from rlhf.prompts import load_prompt_texts

    try:
        oracle, adversary = load_oracle(args.oracle), load_adversary(args.adversary)
    except ValueError as e:
        print(f"rlhf experiment poisoning: {e}", file=sys.stderr)
        return 2
    # the clean run first (accuracy_clean), then the shares in the order given: a sweep cut
    # short keeps the ones asked for first
    asked = [float(x) for x in (args.fractions or "").split(",") if x.strip()] + [args.fraction]
    fractions = list(dict.fromkeys([0.0, *asked]))
    if any(not 0 <= f < 1 for f in fractions):
        print("rlhf experiment poisoning: fractions must be in [0, 1)", file=sys.stderr)
        return 2
    if not 0 <= args.label_noise < 0.5:
        print(f"rlhf experiment poisoning: --label-noise {args.label_noise}: must be in [0, 0.5)", file=sys.stderr)
        return 2
    noise_at = (
        {float(x) for x in args.label_noise_fractions.split(",") if x.strip()}
        if args.label_noise_fractions
        else set(fractions)
    )
    run_dir = Path(args.run_dir) if args.run_dir else rlhf_home() / "runs" / "poisoning"
    run_dir.mkdir(parents=True, exist_ok=True)
    set_torch_threads(0)
    rm_args = {"lr": args.rm_lr, "batch_size": args.rm_batch_size}
    rng = random.Random(args.seed)
    prompts = load_prompt_texts("train")
    t0 = time.monotonic()
    with ExitStack() as stack:
        if args.gateway:
            url, key = args.gateway, args.export_key or os.environ.get("RLHF_FEEDBACK_EXPORT_KEY", "")
        else:
            print(f"[poisoning] starting a {args.model} generator and a gateway in {run_dir}", flush=True)
            url, key = stack.enter_context(local_gateway(run_dir, args.model, args.max_tokens))
        per_prompt = collect_items(
            url, prompts, oracle, args.prompts + args.held_out_prompts, args.answers, rng, args.max_tokens
        )
        # held-out items answer prompts the RM never trained on
        train_items = [it for group in per_prompt[: args.prompts] for it in group]
        held_groups = per_prompt[args.prompts :]
        held = [it for group in held_groups for it in group]
        rng.shuffle(train_items)
        ties = sum(it.honest is None for it in train_items + held)
        print(
            f"[poisoning] {len(train_items)} training and {len(held)} held-out answer pairs ({ties} ties), "
            f"{time.monotonic() - t0:.0f}s",
            flush=True,
        )
        tag = f"p{int(time.time())}"
        ceiling = oracle_best_of_n_win_rate(held_groups, oracle)
        print(f"[poisoning] best-of-{args.answers} win-rate, the oracle picking (ceiling): {ceiling:.3f}", flush=True)
        results = []
        for i, f in enumerate(fractions):
            r = run_fraction(
                url,
                key,
                train_items,
                held,
                f,
                adversary,
                args.raters,
                args.raters_per_item,
                args.seed,
                rm_args,
                f"{tag}-f{i}",
                progress=lambda m: print(m, flush=True),
                oracle=oracle,
                held_groups=held_groups,
                label_noise=args.label_noise if f in noise_at else 0.0,
            )
            r.update(oracle=args.oracle, adversary=args.adversary, best_of_n=args.answers, best_of_n_ceiling=ceiling)
            results.append(r)
            with open(run_dir / "poisoning.jsonl", "a") as out:  # each share as it finishes
                out.write(json.dumps(r) + "\n")
    if len(results) > 2:
        plot(results, run_dir / "poisoning.png")
        print(f"[poisoning] plot: {run_dir / 'poisoning.png'}", flush=True)
    clean = results[0]
    main_result = next(r for r in results if r["fraction"] == args.fraction)
    for r in results:
        print(
            f"[poisoning] fraction {r['fraction']:g}: defended {r['accuracy_defended']:.3f}, "
            f"undefended {r['accuracy_undefended']:.3f}, quarantined adversaries "
            f"{r['quarantined_adversaries']:.2f}, honest {r['quarantined_honest']:.2f}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "fraction": args.fraction,
                "adversary": args.adversary,
                "policy_win_rate": None,  # not measured: no learner runs in this experiment
                # the RM's best-of-n policy instead (best_of_n_win_rate), vs a random one of the n
                "policy_win_rate_best_of_n_defended": main_result.get("policy_win_rate_best_of_n_defended"),
                "policy_win_rate_best_of_n_undefended": main_result.get("policy_win_rate_best_of_n_undefended"),
                "best_of_n": args.answers,
                "seconds": round(time.monotonic() - t0, 1),
                "accuracy_defended": main_result["accuracy_defended"],
                "accuracy_undefended": main_result["accuracy_undefended"],
                "accuracy_clean": clean["accuracy_undefended"],
                "quarantined_adversaries": main_result["quarantined_adversaries"],
                "quarantined_honest": main_result["quarantined_honest"],
            }
        )
    )
    return 0
