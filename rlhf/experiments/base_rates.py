"""`rlhf experiment base-rates`: how often does a model already do what an oracle rewards?

A preference the policy shows in half its answers is learned from a handful of comparisons;
one it shows in 1 % needs the rollouts to find it first. Before comparing objectives on an
oracle, measure its base rate: sample `--samples` answers per held-out prompt from the model
in this process (temperature 1, full distribution — what the rollout worker samples), and
report, for every built-in oracle with a yes/no behaviour (rlhf.experiments.oracles.PROPERTY)
and for `--oracle` ones that declare a `property`, the share of answers that show it with a
Wilson 95 % interval. The answers go to <run-dir>/answers.jsonl; the last stdout line is one
JSON object {oracle: rate}.
"""

from __future__ import annotations

import json
import sys
import time

from rlhf.experiments.oracles import PROPERTY, load_oracle, property_of, words
from rlhf.experiments.runlog import RunFolder, table
from rlhf.experiments.winrate import mean, win_rate_interval
from rlhf.prompts import load_prompt_texts


def rates(answers: list[str], properties: dict[str, object]) -> list[dict]:
    rows = []
    for name, prop in properties.items():
        rate = mean([float(bool(prop(a))) for a in answers])
        low, high = win_rate_interval(rate, len(answers))
        rows.append(
            {
                "oracle": name,
                "base_rate": rate,
                "low": low,
                "high": high,
                "answers": len(answers),
                "showing": round(rate * len(answers)),
            }
        )
    return rows


def main(args) -> int:
    import torch

    from rlhf.experiments.sampling import sample
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model, rlhf_home, set_torch_threads

    properties: dict[str, object] = dict(PROPERTY)
    try:
        for spec in args.oracle or []:
            prop = property_of(load_oracle(spec))
            if prop is None:
                raise ValueError(f"oracle {spec!r} rewards no yes/no behaviour: give it a `property` attribute")
            properties[spec] = prop
        prompts = load_prompt_texts("heldout", args.prompts)
        path = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"rlhf experiment base-rates: {e}", file=sys.stderr)
        return 2
    if args.n:
        prompts = prompts[: args.n]
    run = RunFolder(args.run_dir or rlhf_home() / "runs" / "base-rates")
    run.write_json("config.json", {k: v for k, v in vars(args).items() if k != "fn"})
    set_torch_threads(args.threads)
    lm = load_causal_lm(path).requires_grad_(False)
    if args.dtype == "bfloat16":
        lm = lm.to(torch.bfloat16)
    tok = load_tokenizer(path)
    expanded = [p for p in prompts for _ in range(args.samples)]
    print(
        f"[base-rates] {path}: {len(prompts)} held-out prompts × {args.samples} answers ≤ {args.max_tokens} tokens",
        flush=True,
    )
    t0, answers = time.monotonic(), []
    for start in range(0, len(expanded), args.batch_size):
        chunk = expanded[start : start + args.batch_size]
        answers += [
            s.text for s in sample(lm, tok, chunk, args.max_tokens, seed=args.seed + start, batch_size=args.batch_size)
        ]
        print(f"[base-rates] {len(answers)}/{len(expanded)} answers ({time.monotonic() - t0:.0f}s)", flush=True)
    for p, a in zip(expanded, answers):
        run.append("answers", {"prompt": p, "answer": a})
    rows = rates(answers, properties)
    print(table(rows, ("oracle", "base_rate", "low", "high", "showing", "answers")))
    print(f"mean words per answer: {mean([len(words(a)) for a in answers]):.1f}")
    run.write_json("summary.json", rows)
    print(json.dumps({r["oracle"]: r["base_rate"] for r in rows}))
    return 0
