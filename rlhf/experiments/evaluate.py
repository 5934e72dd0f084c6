"""`rlhf eval`: is the served policy better than the reference, and how far has it drifted?

Against a running stack, on held-out prompts (never in the simulated users' set):

  policy answers     GenerationService.Generate (the served version; temperature 1, full
                     distribution, so its per-token log-probs are those of π_θ). The
                     generator, not the gateway: eval traffic is not user traffic and must
                     not land in rlhf.interactions as live prompts.
  reference answers  the frozen reference model loaded in this process (the folder
                     ReferenceService.GetInfo names), sampled the same way, once per run
                     folder and cached: the reference never changes.
  KL                 KL(π_θ‖π_ref) ≈ mean over policy answers of Σ_t log π_θ(y_t) − log π_ref(y_t),
                     π_ref's log-probs from ReferenceService.LogProbs (k1, unbiased).
  win-rate           the oracle compares policy answer i with reference answer i of the
                     same prompt; ties count half.
  property rate      for an oracle that rewards a yes/no behaviour (a closing question, a
                     keyword: rlhf.experiments.oracles.property_of), the share of answers
                     that show it, each side; the reference's is the behaviour's base rate.
  reward             RewardService.Score of both sides; RM accuracy: the reward service's
                     online (progressive-validation) accuracy, and how often the RM orders
                     a (policy, reference) pair as the oracle does.
  RM probes          controlled pairs from the reference answers (rlhf/experiments/probes.py):
                     rm_probe_property_accuracy (same length, property on vs off),
                     rm_probe_longer_wins and rm_probe_score_per_10_words (same property,
                     longer vs shorter): does the RM see the preference or the length?

Each round appends one line to <run>/eval.jsonl and redraws <run>/eval.png; the last
stdout line is one JSON object (policy_version, win_rate, kl_to_reference, n_prompts, ...).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf.experiments.clients import Endpoints, failure
from rlhf.experiments.oracles import Oracle, load_oracle, property_of, words
from rlhf.experiments.runlog import RunFolder, line_plot, table
from rlhf.experiments.winrate import mean, sequence_kl, win_rate, win_rate_interval
from rlhf.prompts import load_prompt_texts


def rm_agreement(
    rm_ours: list[float], rm_theirs: list[float], oracle_ours: list[float], oracle_theirs: list[float]
) -> float:
    """Share of pairs the RM orders as the oracle does (pairs the oracle ties are skipped)."""
    right = total = 0
    for a, b, c, d in zip(rm_ours, rm_theirs, oracle_ours, oracle_theirs):
        if c == d:
            continue
        total += 1
        right += (a - b) * (c - d) > 0
    return right / total if total else float("nan")


class ReferenceAnswers:
    """The reference model's answers to the eval prompts, sampled once and cached in the run folder."""

    def __init__(self, run: RunFolder, model_name: str, max_tokens: int, seed: int):
        self.run, self.model_name, self.max_tokens, self.seed = run, model_name, max_tokens, seed

    def get(self, prompts: list[str], progress=print) -> list[str]:
        key = {"model": self.model_name, "max_tokens": self.max_tokens, "seed": self.seed}
        cached = [r for r in self.run.read("reference_answers") if r.get("key") == key]
        have = {(r["i"], r["prompt"]): r["text"] for r in cached}
        if all((i, p) in have for i, p in enumerate(prompts)):
            return [have[(i, p)] for i, p in enumerate(prompts)]
        import torch

        from rlhf.experiments.sampling import sample
        from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

        path = resolve_model(self.model_name)
        progress(f"[eval] sampling {len(prompts)} reference answers from {path} (once per run folder)")
        t0 = time.monotonic()
        lm, tok = load_causal_lm(path).requires_grad_(False), load_tokenizer(path)
        answers = []
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            answers += [s.text for s in sample(lm, tok, chunk, self.max_tokens, seed=self.seed + start, batch_size=16)]
            progress(f"[eval] reference answers {len(answers)}/{len(prompts)} ({time.monotonic() - t0:.0f}s)")
        del lm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        for i, (p, t) in enumerate(zip(prompts, answers)):
            self.run.append("reference_answers", {"key": key, "i": i, "prompt": p, "text": t})
        return answers


def evaluate_round(
    ep: Endpoints,
    oracle: Oracle,
    prompts: list[str],
    samples: int,
    max_tokens: int,
    run: RunFolder,
    seed: int = 0,
    reference_model: str | None = None,
    progress=print,
    concurrency: int = 8,
) -> dict:
    import grpc

    from rlhf import priorities
    from rlhf.serving.client import sync_channel
    from rlhf.v1 import (
        common_pb2,
        generation_pb2,
        generation_pb2_grpc,
        reference_pb2,
        reference_pb2_grpc,
        reward_pb2,
        reward_pb2_grpc,
    )

    t0 = time.monotonic()
    expanded = [p for p in prompts for _ in range(samples)]
    with sync_channel(ep.generator) as gch, sync_channel(ep.reference) as rch, sync_channel(ep.reward) as wch:
        gen = generation_pb2_grpc.GenerationServiceStub(gch)
        ref = reference_pb2_grpc.ReferenceServiceStub(rch)
        rew = reward_pb2_grpc.RewardServiceStub(wch)
        ref_info = ref.GetInfo(reference_pb2.ReferenceInfoRequest(), timeout=30)

        # 1. the served policy's answers, with token ids and log π_θ; requests in flight
        #    together so that the generator batches them
        def generate(i: int):
            return gen.Generate(
                generation_pb2.GenerateRequest(
                    request_id=f"eval-{int(time.time())}-{i}",
                    messages=common_pb2.ChatMessages(
                        messages=[common_pb2.ChatMessage(role="user", content=prompts[i])]
                    ),
                    params=generation_pb2.SamplingParams(
                        n=samples,
                        temperature=1.0,
                        top_p=1.0,
                        max_tokens=max_tokens,
                        seed=seed + i,
                        priority=priorities.BACKGROUND,
                    ),
                ),
                timeout=600,
            )

        answers, versions = [], set()
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            for i, resp in enumerate(pool.map(generate, range(len(prompts)))):
                versions.add(resp.policy_version)
                for s in sorted(resp.samples, key=lambda s: s.index):
                    answers.append((list(resp.prompt_token_ids), s))
                if (i + 1) % 8 == 0 or i + 1 == len(prompts):
                    progress(
                        f"[eval] policy answers {i + 1}/{len(prompts)} prompts "
                        f"(v{resp.policy_version}, {time.monotonic() - t0:.0f}s)"
                    )
        version = max(versions)

        # 2. KL to the reference: π_ref's log-probs of the policy's own tokens
        kls = []
        for start in range(0, len(answers), 16):
            chunk = answers[start : start + 16]
            lp = ref.LogProbs(
                reference_pb2.LogProbsRequest(
                    items=[
                        reference_pb2.LogProbsItem(prompt_token_ids=pids, response_token_ids=list(s.token_ids))
                        for pids, s in chunk
                    ]
                ),
                timeout=600,
            )
            kls += [sequence_kl(list(s.logprobs), list(r.logprobs)) for (_, s), r in zip(chunk, lp.results)]

        # 3. the reference's answers, and the oracle's verdicts
        theirs = ReferenceAnswers(run, reference_model or ref_info.model, max_tokens, seed).get(expanded, progress)
        ours = [s.text for _, s in answers]
        o_ours = [oracle(p, t) for p, t in zip(expanded, ours)]
        o_theirs = [oracle(p, t) for p, t in zip(expanded, theirs)]
        rate = win_rate(o_ours, o_theirs)

        # 4. the reward model's view
        def score(texts: list[str]) -> tuple[list[float], int]:
            out, v = [], 0
            for start in range(0, len(texts), 32):
                r = rew.Score(
                    reward_pb2.ScoreRequest(
                        items=[
                            reward_pb2.ScoreItem(prompt=[common_pb2.ChatMessage(role="user", content=p)], response=t)
                            for p, t in zip(expanded[start : start + 32], texts[start : start + 32])
                        ]
                    ),
                    timeout=300,
                )
                out += list(r.scores)
                v = r.rm_version
            return out, v

        try:
            r_ours, rm_version = score(ours)
            r_theirs, _ = score(theirs)
            rm_info = rew.GetInfo(reward_pb2.RewardInfoRequest(), timeout=30)
            rm = {
                "reward": mean(r_ours),
                "reward_reference": mean(r_theirs),
                "rm_version": rm_version,
                "rm_online_accuracy": rm_info.online_accuracy,
                "rm_pairs_seen": rm_info.pairs_seen,
                "rm_oracle_agreement": rm_agreement(r_ours, r_theirs, o_ours, o_theirs),
            }
        except grpc.RpcError as e:  # the RM is optional to the verdict; say why it is missing
            progress(f"[eval] reward service: {e.code().name}: {e.details()}")
            rm = {}
        if rm:
            try:
                rm.update(probe_round(rew, getattr(oracle, "__name__", ""), expanded, theirs, seed))
            except grpc.RpcError as e:
                progress(f"[eval] reward service, controlled pairs: {e.code().name}: {e.details()}")

    low, high = win_rate_interval(rate, len(o_ours))
    prop = property_of(oracle)
    shown = (
        {}
        if prop is None
        else {
            "property_rate": mean([float(bool(prop(t))) for t in ours]),
            "property_rate_reference": mean([float(bool(prop(t))) for t in theirs]),
        }
    )
    return {
        "time": time.time(),
        "policy_version": version,
        "policy_versions_seen": sorted(versions),
        "win_rate": rate,
        "win_rate_low": low,
        "win_rate_high": high,
        "kl_to_reference": mean(kls),
        "oracle": mean(o_ours),
        "oracle_reference": mean(o_theirs),
        "words": mean([len(words(t)) for t in ours]),
        "words_reference": mean([len(words(t)) for t in theirs]),
        **shown,
        **rm,
        "n_prompts": len(prompts),
        "n_answers": len(ours),
        "seconds": time.monotonic() - t0,
    }


def probe_round(rew, oracle_name: str, prompts: list[str], answers: list[str], seed: int) -> dict:
    """The RM on controlled pairs built from the reference's answers (rlhf.experiments.probes):
    does it see the oracle's property at equal length, and how much does length alone move
    it? Scores are the served (normalised) ones, so score_per_10_words is in RM std units."""
    from rlhf.experiments.probes import build_probes, probe_report
    from rlhf.v1 import common_pb2, reward_pb2

    def score(ps: list[str], texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), 32):
            out += list(
                rew.Score(
                    reward_pb2.ScoreRequest(
                        items=[
                            reward_pb2.ScoreItem(prompt=[common_pb2.ChatMessage(role="user", content=p)], response=t)
                            for p, t in zip(ps[start : start + 32], texts[start : start + 32])
                        ]
                    ),
                    timeout=300,
                ).scores
            )
        return out

    prop, length = build_probes(oracle_name, prompts, answers, seed=seed)
    return probe_report(score, prop, length)


SUMMARY_COLUMNS = (
    "policy_version",
    "win_rate",
    "kl_to_reference",
    "oracle",
    "oracle_reference",
    "property_rate",
    "property_rate_reference",
    "reward",
    "rm_online_accuracy",
    "rm_oracle_agreement",
    "rm_probe_property_accuracy",
    "rm_probe_longer_wins",
    "rm_probe_score_per_10_words",
    "words",
    "n_prompts",
)


def plot_eval(run: RunFolder, target: float | None = None) -> Path | None:
    """eval.png from eval.jsonl. Rows of `rlhf experiment win-rate` carry `minutes` (since
    the first feedback) and `feedback` (events accepted by then): x is that clock, and a
    panel shows the feedback count; plain `rlhf eval` rows use time since the first round."""
    rows = run.read("eval")
    if not rows:
        return None
    live = all("minutes" in r for r in rows)
    x = [r["minutes"] for r in rows] if live else [(r["time"] - rows[0]["time"]) / 60 for r in rows]
    hlines = [(0.5, "0.5 = as good as the reference")] + ([(target, f"target {target:g}")] if target else [])
    panels = [
        ("KL(π‖π_ref) per answer, nats", [("KL to reference", [r["kl_to_reference"] for r in rows])]),
        (
            "reward model",
            [
                ("RM score, policy", [r.get("reward", float("nan")) for r in rows]),
                ("RM score, reference", [r.get("reward_reference", float("nan")) for r in rows]),
                ("RM online accuracy", [r.get("rm_online_accuracy", float("nan")) for r in rows]),
            ],
        ),
        (
            "words per answer",
            [("policy", [r["words"] for r in rows]), ("reference", [r["words_reference"] for r in rows])],
        ),
        *(
            [
                (
                    "answers showing the rewarded behaviour",
                    [
                        ("policy", [r["property_rate"] for r in rows]),
                        ("reference (base rate)", [r["property_rate_reference"] for r in rows]),
                    ],
                )
            ]
            if all("property_rate" in r for r in rows)
            else []
        ),
        ("served policy version", [("version", [r["policy_version"] for r in rows])]),
    ]
    if live:
        panels.append(("feedback events accepted", [("feedback", [r["feedback"] for r in rows])]))
    return line_plot(
        run.path("eval.png"),
        "win-rate vs the reference (oracle)",
        x,
        [
            ("win-rate", [r["win_rate"] for r in rows]),
            ("95% interval, low", [r["win_rate_low"] for r in rows]),
            ("95% interval, high", [r["win_rate_high"] for r in rows]),
        ],
        hlines=hlines,
        xlabel="minutes since the first feedback (0: the baseline, before any)"
        if live
        else "minutes since the first eval",
        panels=panels,
    )


def main(args) -> int:
    from rlhf.models import rlhf_home

    try:
        oracle = load_oracle(args.oracle)
        prompts = load_prompt_texts("heldout", args.prompts)
    except ValueError as e:
        print(f"rlhf eval: {e}", file=sys.stderr)
        return 2
    if args.n:
        prompts = [prompts[i % len(prompts)] for i in range(args.n)]
    ep = Endpoints.discover(args.state_dir, generator=args.generator, reference=args.reference, reward=args.reward)
    run = RunFolder(args.run_dir or rlhf_home() / "runs" / "eval")
    run.write_json("config.json", {k: v for k, v in vars(args).items() if k != "fn"})
    print(
        f"[eval] {len(prompts)} held-out prompts × {args.samples} answers, oracle {args.oracle}, run folder {run.root}",
        flush=True,
    )
    record: dict = {}
    for i in range(args.rounds):
        if i:
            time.sleep(args.every)
        try:
            record = evaluate_round(
                ep,
                oracle,
                prompts,
                args.samples,
                args.max_tokens,
                run,
                args.seed,
                args.reference_model,
                progress=lambda m: print(m, flush=True),
                concurrency=args.concurrency,
            )
        except Exception as e:  # noqa: BLE001 - a stack that is down is the caller's to fix: say which service
            print(f"rlhf eval: {failure(e)}", file=sys.stderr)
            return 1
        record["oracle_name"] = args.oracle
        run.append("eval", record)
        plot_eval(run)
        print(
            f"[eval] round {i + 1}/{args.rounds}: policy v{record['policy_version']} win-rate {record['win_rate']:.3f} "
            f"[{record['win_rate_low']:.2f}, {record['win_rate_high']:.2f}] KL {record['kl_to_reference']:.3f} nats",
            flush=True,
        )
    print()
    print(table(run.read("eval"), SUMMARY_COLUMNS))
    print(f"\nplots: {run.path('eval.png')}   records: {run.path('eval.jsonl')}")
    print(json.dumps(record))
    return 0
