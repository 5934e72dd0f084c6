"""What users' feedback costs a learner step (docs/learner.md, "Users' own feedback").

    .venv/bin/python benchmarks/user_feedback.py            # tiny random model, ≈ 1 min on 2 cores
    .venv/bin/python benchmarks/user_feedback.py --model DIR --steps 3

One PPO step on the same 16 rollouts (LoRA, 2 epochs × 2 minibatches) with 0, 4 and 16
users' examples of each mode (user_feedback=dpo: comparisons, a pair is two forwards plus
π_ref's once; distill: thumbs-up answers, one forward each). Prints the median step time
of `--steps` steps and what the users' term adds, side by side: an extra forward/backward in
each of the step's optimizer steps, so it grows with the optimizer steps more than with
the events (they share those passes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rlhf.bus import new_event  # noqa: E402
from rlhf.learner import PPOConfig, PPOTrainer, build_policy  # noqa: E402
from rlhf.learner.batch import collate  # noqa: E402
from rlhf.learner.feedback import FeedbackLimits, feedback_examples  # noqa: E402
from rlhf.learner.feedback_loss import collate_feedback  # noqa: E402
from rlhf.models import build_tiny_model, load_tokenizer, pad_id, set_torch_threads  # noqa: E402
from rlhf.v1 import common_pb2, events_pb2  # noqa: E402

ROLLOUTS, PROMPT, RESPONSE = 16, 24, 16


def rollouts(vocab: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(ROLLOUTS):
        out.append(
            new_event(
                events_pb2.Rollout,
                prompt_id=f"p{i}",
                prompt_token_ids=torch.randint(3, vocab, (PROMPT,), generator=g).tolist(),
                response_token_ids=torch.randint(3, vocab, (RESPONSE,), generator=g).tolist(),
                logprobs=[-2.0] * RESPONSE,
                ref_logprobs=[-2.0] * RESPONSE,
                score=float(i % 2),
            )
        )
    return out


def feedback(mode: str, n: int, tok):
    limits = FeedbackLimits(1024, 512)
    examples = []
    for i in range(n):
        prompt = [common_pb2.ChatMessage(role="user", content=f"Which city is the capital of France? ({i})")]
        kind = (
            {"comparison": events_pb2.Comparison(chosen="Paris is the capital of France.", rejected="Lyon, I think.")}
            if mode == "dpo"
            else {"rating": events_pb2.Rating(response="Paris is the capital of France.", value=1)}
        )
        examples += feedback_examples(new_event(events_pb2.Feedback, prompt=prompt, **kind), mode, tok, limits)
    return collate_feedback(examples, pad_id(tok)) if examples else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder (default: a tiny random model with the SmolLM2 tokenizer)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_torch_threads(args.threads)
    model = Path(args.model) if args.model else build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    tok = load_tokenizer(model)
    batch = collate(rollouts(min(len(tok), 1000)), pad_id(tok))
    rows = []
    for mode in ("dpo", "distill"):
        for n in (0, 4, 16):
            cfg = PPOConfig(batch_size=ROLLOUTS, minibatch_size=8, micro_batch_size=8, ppo_epochs=2, user_feedback=mode)
            trainer = PPOTrainer(build_policy(model, cfg), cfg)
            fb = feedback(mode, n, tok)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                trainer.step(batch, fb)
                times.append(time.perf_counter() - start)
            rows.append((mode, n, statistics.median(times)))
    base = {mode: t for mode, n, t in rows if n == 0}
    print(f"model {model.name}, {ROLLOUTS} rollouts ({PROMPT}+{RESPONSE} tokens), LoRA, 2 epochs × 2 minibatches")
    print(f"{'mode':8} {'events':>6} {'step s':>8} {'added s':>8} {'added':>7}")
    for mode, n, t in rows:
        added = f"{t - base[mode]:>8.2f} {(t - base[mode]) / base[mode]:>7.0%}" if n else f"{'–':>8} {'–':>7}"
        print(f"{mode:8} {n:>6} {t:>8.2f} {added}")


if __name__ == "__main__":
    main()
