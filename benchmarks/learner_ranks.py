"""The learner's PPO step on 1 vs 2 (or more) torchrun ranks: tokens/s and peak memory per rank.

    .venv/bin/python benchmarks/learner_ranks.py                          # tiny model, CPU, gloo, 1 and 2 ranks
    .venv/bin/python benchmarks/learner_ranks.py --model smollm2-135m --threads 1
    .venv/bin/python benchmarks/learner_ranks.py --model smollm2-135m --device cuda --ranks 1 2 4 \\
        --prompt-len 128 --response-len 128 --batch-size 32 --micro-batch-size 8   # NCCL, one GPU per rank

Each world size runs as `torchrun --standalone --nproc-per-node W` of this file: every rank
builds the policy and a PPOTrainer over torch.distributed (rlhf/learner/distributed.py, the
learner's own code path); rank 0 steps on a fixed batch of random prompts of exactly
--prompt-len tokens with responses of exactly --response-len tokens (random tokens and
log-probs: the step's cost does not depend on them), the others follow, as in the service.
tokens/s = batch × (prompt + response) × epochs / step seconds (rank 0's, median of --updates
after --warmup), the same definition as benchmarks/learner.py. Peak memory: per rank, the
largest RSS sampled every 5 ms within the steps (CPU), or CUDA max_memory_allocated.

On CPU, --threads sets each rank's torch threads: 2 ranks × 1 thread against 1 rank × 1
thread shows what the split buys on cores that are free; with fewer free cores than ranks
they only take turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learner import PeakMemory, prepare_model, random_prompts  # noqa: E402  (benchmarks/learner.py)


def fixed_batch(args, vocab: int, avoid: set[int]):
    import torch

    from rlhf.learner.batch import collate

    g = torch.Generator().manual_seed(1)
    prompts = random_prompts(args.batch_size, args.prompt_len, vocab, avoid)
    responses = random_prompts(args.batch_size, args.response_len, vocab, avoid, seed=2)
    rollouts = [
        SimpleNamespace(
            event_id=f"r{i}",
            prompt_token_ids=p,
            response_token_ids=r,
            logprobs=(-torch.rand(len(r), generator=g) * 4).tolist(),
            ref_logprobs=(-torch.rand(len(r), generator=g) * 4).tolist(),
            score=float(i % 2),
            policy_version=0,
        )
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    return collate(rollouts, 2)


def rank_main(args) -> None:
    """One rank under torchrun: rank 0 steps and times, the others follow; each writes its peak."""
    import torch

    from rlhf.learner import PPOConfig, PPOTrainer, build_policy
    from rlhf.learner.distributed import Ranks
    from rlhf.models import load_tokenizer, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ranks = Ranks.from_env(resolve_device(args.device), timeout_seconds=1800)
    device = ranks.device(resolve_device(args.device))
    cfg = PPOConfig(
        finetune=args.finetune,
        batch_size=args.batch_size,
        minibatch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        ppo_epochs=args.ppo_epochs,
        lr=1e-6,
        mixed_precision="bf16" if args.bf16 else "no",
    )
    policy = build_policy(args.model_dir, cfg, device)
    trainer = PPOTrainer(policy, cfg, ranks)
    memory = PeakMemory(str(device))
    result: dict = {"rank": ranks.rank, "world_size": ranks.world_size}
    if ranks.leader:
        tok = load_tokenizer(args.model_dir)
        batch = fixed_batch(args, len(tok), {tok.pad_token_id, tok.eos_token_id})
        times = []
        for update in range(args.warmup + args.updates):
            if update == args.warmup:
                memory.start()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if update >= args.warmup:
                times.append(time.perf_counter() - start)
        result["step_seconds"] = times
        result["peak_bytes"] = memory.stop()
        trainer.release()
    else:
        memory.start()  # from the first command on: warm-up included (a follower cannot tell)
        trainer.follow()
        result["peak_bytes"] = memory.stop()
    Path(args.out, f"rank{ranks.rank}.json").write_text(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help='"tiny", "smollm2-135m" (random weights) or a model folder')
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--finetune", default="full", choices=["full", "lora"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--updates", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (0: torch's default)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args)
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        model_dir = prepare_model(args.model, Path(tmp) / "model")
        passthrough = sys.argv[1:]
        for world in args.ranks:
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
            cmd += [__file__, *passthrough, "--rank-main", "--model-dir", str(model_dir), "--out", str(out)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{world} ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
                return 1
            results[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]

    tokens = args.batch_size * (args.prompt_len + args.response_len) * args.ppo_epochs
    print(
        f"\nPPO step on W ranks: model={args.model} device={args.device} finetune={args.finetune} "
        f"batch={args.batch_size} micro={args.micro_batch_size} prompt={args.prompt_len} "
        f"response={args.response_len} epochs={args.ppo_epochs} threads/rank={args.threads} bf16={args.bf16} "
        f"(median of {args.updates} steps after {args.warmup} warm-up)\n"
    )
    print("| ranks | step s | tokens/s | speed-up | peak MiB per rank |")
    print("|---:|---:|---:|---:|---|")
    base = None
    for world, ranks in results.items():
        seconds = statistics.median(ranks[0]["step_seconds"])
        base = base or seconds
        peaks = " / ".join(f"{r['peak_bytes'] / 2**20:,.0f}" for r in ranks)
        print(f"| {world} | {seconds:.3f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x | {peaks} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
