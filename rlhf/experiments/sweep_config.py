"""The kl-sweep's settings and flags (no torch: `rlhf --help` stays fast)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class SweepConfig:
    betas: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])  # fixed KL coefficients, one run each
    steps: int = 120  # PPO steps per β
    model: str = "toy"  # "toy", "demo" (SmolLM2-135M-Instruct) or a model folder
    sft_steps: int = 200  # toy model only: supervised steps of stage 1
    oracle: str = "keyword_concise"  # gold oracle: true quality, plotted and used for win-rates
    rater: str = "verbose_rater"  # who labels the RM's comparisons (the gold oracle + a bias)
    rm_backbone: str = "tiny"  # reward-model backbone: "tiny", "minilm", "policy" or a folder
    rm_pairs: int = 768  # rater comparisons the RM learns from
    rm_epochs: int = 3  # passes over them
    rm_lr: float = 3e-4  # reward-model learning rate (AdamW)
    objective: str = "ppo"  # the learner's objective: ppo, grpo or rloo (β is the KL coefficient of each)
    group_size: int = 4  # grpo/rloo: answers per prompt in a step (a group), batch_size / group_size prompts
    batch_size: int = 16  # rollouts per PPO step
    ppo_epochs: int = 2  # K
    lr: float = 3e-4  # PPO learning rate
    max_new_tokens: int = 48  # answer length cap, tokens
    kl_budget: float = 6.0  # drift gate: KL(π‖π_ref) per answer on held-out prompts, nats
    gate_every: int = 5  # a version (and a gate check) every N steps
    heldout_prompts: int = 16  # held-out prompts for the drift gate and the win-rate
    eval_samples: int = 4  # held-out answers per prompt for the win-rate at each version
    seed: int = 0
    threads: int = 1  # torch CPU threads (the machine is shared)
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when there is one)


# objectives whose KL coefficient is the sweep's β; online_dpo's β is the DPO temperature and
# best_of_n has none, so the sweep's three regimes do not apply to them
SWEEP_OBJECTIVES = ("ppo", "grpo", "rloo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="PPO steps per β")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in d.betas), help="comma-separated fixed β values")
    p.add_argument(
        "--model",
        default=d.model,
        help='"toy" (tiny SFT model, minutes), "demo" (SmolLM2-135M, hours on CPU) or a folder',
    )
    p.add_argument("--oracle", default=d.oracle, help="gold oracle, module:function or a built-in name")
    p.add_argument("--rater", default=d.rater, help="who labels the RM's comparisons, module:function or built-in")
    p.add_argument("--rm-backbone", default=d.rm_backbone, help='"tiny", "minilm", "policy" or a folder')
    p.add_argument("--rm-pairs", type=int, default=d.rm_pairs, help="rater comparisons the RM learns from")
    p.add_argument("--rm-epochs", type=int, default=d.rm_epochs, help="passes over the comparisons")
    p.add_argument("--rm-lr", type=float, default=d.rm_lr, help="reward-model learning rate")
    p.add_argument(
        "--objective",
        default=d.objective,
        choices=SWEEP_OBJECTIVES,
        help="learner objective; β is its KL coefficient (grpo/rloo: KL in the reward, as ppo)",
    )
    p.add_argument("--group-size", type=int, default=d.group_size, help="grpo/rloo: answers per prompt in a step")
    p.add_argument("--ppo-epochs", type=int, default=d.ppo_epochs, help="PPO epochs per batch (K)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rollouts per PPO step")
    p.add_argument("--lr", type=float, default=d.lr, help="PPO learning rate")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length cap")
    p.add_argument("--kl-budget", type=float, default=d.kl_budget, help="drift gate budget, nats per answer")
    p.add_argument("--gate-every", type=int, default=d.gate_every, help="steps between versions")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help='"cpu", "cuda" or "auto"')
    p.add_argument("--out", default="kl-sweep", help="output folder (plots, report, JSON lines)")


def config_from_args(args) -> SweepConfig:
    if args.objective != "ppo" and (args.group_size < 2 or args.batch_size % args.group_size):
        raise SystemExit(
            f"rlhf experiment kl-sweep: --group-size {args.group_size} must be ≥ 2 and divide "
            f"--batch-size {args.batch_size} (a step is whole groups)"
        )
    return SweepConfig(
        betas=[float(b) for b in args.betas.split(",") if b.strip()],
        steps=args.steps,
        model=args.model,
        oracle=args.oracle,
        rater=args.rater,
        rm_backbone=args.rm_backbone,
        rm_pairs=args.rm_pairs,
        rm_epochs=args.rm_epochs,
        rm_lr=args.rm_lr,
        ppo_epochs=args.ppo_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_new_tokens=args.max_new_tokens,
        kl_budget=args.kl_budget,
        gate_every=args.gate_every,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        objective=args.objective,
        group_size=args.group_size,
    )
