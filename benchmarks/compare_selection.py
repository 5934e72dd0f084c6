"""Comparisons gained per chat by the gateway's compare_selection: of the pairs a person is
shown, the fraction that are NOT ties under an oracle (a tie yields no comparison), for
"first" (today: the first two samples), "diverse" and "rm_uncertain", on the same
candidates (same prompts, same seeds).

    .venv/bin/python benchmarks/compare_selection.py                    # SmolLM2-135M, a few minutes
    .venv/bin/python benchmarks/compare_selection.py --model tiny --prompts 8

1. k answers per prompt from the policy (transformers sampling, T = 1, one seed per prompt),
   for `--prompts` evaluation prompts (held-out set) and `--train-prompts` training prompts.
2. Each oracle judges every candidate; a pair is a tie when the two scores are equal (what
   `rlhf simulate` skips), and "decisive" when they differ by ≥ 0.5 (the oracle's property
   differs, not only its length tie-break).
3. The pair each selection picks, with the functions the gateway runs
   (services/gateway/compare.py); rm_uncertain with an untrained RM (tiny backbone, seeded
   head) and with the same RM trained on that oracle's labelled pairs of the training prompts.
4. A table per oracle; "any pair" is the ceiling: prompts where some pair of the k is not a tie.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.experiments.oracles import load_oracle  # noqa: E402
from rlhf.prompts import load_prompt_texts  # noqa: E402
from services.gateway.compare import most_diverse_pair, most_uncertain_pair  # noqa: E402

ORACLES = ("prefers_question_ending", "prefers_keyword", "prefers_concise")
DECISIVE = 0.5


def sample(model_name: str, prompts: list[str], k: int, tokens: int, seed: int) -> list[list[str]]:
    import torch
    import transformers

    from rlhf.models import build_tiny_model, resolve_model

    if model_name == "tiny":
        path = Path(tempfile.mkdtemp(prefix="compare-tiny-"))
        build_tiny_model(path)
    else:
        path = resolve_model(model_name)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    out = []
    for p, prompt in enumerate(prompts):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        torch.manual_seed(seed + p)
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=tokens,
                num_return_sequences=k,
                pad_token_id=tok.eos_token_id,
            )
        out.append([tok.decode(g[ids.shape[1] :], skip_special_tokens=True).strip() for g in gen])
        print(f"  sampled {p + 1}/{len(prompts)}", end="\r", file=sys.stderr)
    print(file=sys.stderr)
    return out


def fresh_rm():
    from rlhf.reward.model import load_reward_model, resolve_backbone

    return load_reward_model(resolve_backbone("tiny"), max_tokens=128, head_seed=0)


def train_rm(oracle, prompts: list[str], cands: list[list[str]], epochs: int):
    """The untrained RM trained on every non-tie pair of the training candidates, labelled by `oracle`."""
    from rlhf.reward.data import Example
    from rlhf.reward.trainer import OnlineRewardTrainer, TrainerConfig

    rm = fresh_rm()
    pairs = []
    for prompt, texts in zip(prompts, cands):
        s = [oracle(prompt, t) for t in texts]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if s[i] != s[j]:
                hi, lo = (i, j) if s[i] > s[j] else (j, i)
                pairs.append(Example(kind="pair", prompt=[("user", prompt)], chosen=texts[hi], rejected=texts[lo]))
    trainer = OnlineRewardTrainer(rm, TrainerConfig(lr=1e-3, train_batch_size=16, replay_ratio=0.0))
    for _ in range(epochs):
        list(trainer.train(pairs))
    return rm, len(pairs)


def scores_of(rm, prompts: list[str], cands: list[list[str]]) -> list[list[float]]:
    flat_p = [[("user", p)] for p, texts in zip(prompts, cands) for _ in texts]
    flat_t = [t for texts in cands for t in texts]
    flat = rm.score(flat_p, flat_t).tolist()
    k = len(cands[0])
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def pair_accuracy(oracle, prompts, cands, scores) -> float:
    right = total = 0
    for prompt, texts, r in zip(prompts, cands, scores):
        s = [oracle(prompt, t) for t in texts]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if s[i] != s[j]:
                total += 1
                right += (s[i] > s[j]) == (r[i] > r[j])
    return right / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="policy: demo (SmolLM2-135M), tiny, or a model folder")
    ap.add_argument("--prompts", type=int, default=48, help="evaluation prompts (held-out set)")
    ap.add_argument("--train-prompts", type=int, default=48, help="prompts whose oracle-labelled pairs train the RM")
    ap.add_argument("--k", type=int, default=4, help="candidates per chat (compare_candidates)")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    ap.add_argument("--epochs", type=int, default=4, help="passes of RM training over the labelled pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracles", default=",".join(ORACLES))
    args = ap.parse_args()

    t0 = time.perf_counter()
    eval_prompts = load_prompt_texts("heldout")[: args.prompts]
    train_prompts = load_prompt_texts("train")[: args.train_prompts]
    cands = sample(args.model, eval_prompts, args.k, args.tokens, args.seed)
    train_cands = (
        sample(args.model, train_prompts, args.k, args.tokens, args.seed + 10_000) if args.train_prompts else []
    )
    untrained = scores_of(fresh_rm(), eval_prompts, cands)
    print(
        f"model {args.model}, k={args.k}, {len(eval_prompts)} held-out chats, {args.tokens} tokens, "
        f"mean {statistics.fmean(len(t.split()) for c in cands for t in c):.1f} words/answer; "
        f"sampled in {time.perf_counter() - t0:.0f} s"
    )

    for name in args.oracles.split(","):
        oracle = load_oracle(name)
        picks = {
            "first": [(0, 1)] * len(cands),
            "diverse": [most_diverse_pair(c) for c in cands],
            "rm_uncertain (untrained RM)": [most_uncertain_pair(r) for r in untrained],
        }
        notes = [f"untrained RM pair accuracy {pair_accuracy(oracle, eval_prompts, cands, untrained):.2f}"]
        if train_cands:
            rm, n_pairs = train_rm(oracle, train_prompts, train_cands, args.epochs)
            trained = scores_of(rm, eval_prompts, cands)
            picks[f"rm_uncertain (RM trained on {n_pairs} pairs)"] = [most_uncertain_pair(r) for r in trained]
            notes.append(f"trained RM held-out pair accuracy {pair_accuracy(oracle, eval_prompts, cands, trained):.2f}")
        scores = [[oracle(p, t) for t in texts] for p, texts in zip(eval_prompts, cands)]
        any_pair = sum(len(set(s)) > 1 for s in scores) / len(scores)
        any_decisive = sum(max(s) - min(s) >= DECISIVE for s in scores) / len(scores)
        print(f"\noracle {name} ({'; '.join(notes)})")
        print(f"| selection | comparisons per chat (shown pair not a tie) | decisive (Δ ≥ {DECISIVE}) |")
        print("|---|---|---|")
        for label, chosen in picks.items():
            non_tie = sum(s[i] != s[j] for s, (i, j) in zip(scores, chosen)) / len(scores)
            decisive = sum(abs(s[i] - s[j]) >= DECISIVE for s, (i, j) in zip(scores, chosen)) / len(scores)
            print(f"| {label} | {non_tie:.2f} | {decisive:.2f} |")
        print(f"| ceiling: any pair of the {args.k} | {any_pair:.2f} | {any_decisive:.2f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
