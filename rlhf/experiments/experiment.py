"""`rlhf experiment kl-sweep`: the seed's β figure, reproduced with the library's own parts.

Three stages, InstructGPT's, in one process (three full stacks would need three times
the processes on a 2-core machine; every piece of math here is the services' own):

  1. SFT        the policy π_ref: a tiny Llama fine-tuned on toy answers in seconds
                (rlhf.experiments.toy), or SmolLM2-135M (`--model demo`), or any folder
  2. RM         simulated raters compare pairs of π_ref's answers; the reward model
                (rlhf.reward.RewardModel + OnlineRewardTrainer, Bradley-Terry) learns
                from them. The raters are biased: they like what the gold oracle likes
                (the keyword) but also take longer answers for better ones — the RM
                inherits "longer is better", the gold oracle penalises rambling
  3. PPO        for each β: a fresh copy of π_ref trained by rlhf.learner's PPOTrainer on
                r_φ − β·KL with fixed β; the drift gate (rlhf.learner.drift.DriftGate)
                checks every version on held-out prompts; versions go to a WeightStore
                with the learner's verdict fields; a refused version is not served, and at
                the end the run rolls back to the last promoted version as the learner's
                Rollback does (weights from the store, optimizer state reset). Training
                goes on from a refused version (the learner's on_reject="continue"): the
                default "revert" would hide the hacking the figure is about

Outputs in --out: kl-sweep-beta-<β>.png (RM score, −β·KL, total reward; gold oracle;
KL and the gate), kl-sweep-summary.png, kl-sweep.md, steps.jsonl, gate.jsonl.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from rlhf.experiments import oracles as oracle_fns
from rlhf.experiments.runlog import RunFolder
from rlhf.experiments.sampling import Sampled, fill_logprobs, prompt_ids, sample
from rlhf.experiments.sweep_config import SweepConfig
from rlhf.experiments.sweep_report import plot_beta, plot_summary, report
from rlhf.experiments.winrate import win_rate
from rlhf.prompts import load_prompt_texts


def _words(text: str) -> int:
    return len(oracle_fns.words(text))


class World:
    """Stages 1 and 2: π_ref, its tokenizer, the trained RM and its score normaliser."""

    def __init__(self, cfg: SweepConfig, out: RunFolder, log: Callable[[str], None]):
        self.cfg, self.out, self.log = cfg, out, log
        self.oracle = oracle_fns.load_oracle(cfg.oracle)
        self.rater = oracle_fns.load_oracle(cfg.rater)
        self.train_prompts = load_prompt_texts("train")
        self.heldout_prompts = load_prompt_texts("heldout")[: cfg.heldout_prompts]
        from rlhf.models import load_causal_lm, load_tokenizer, pad_id, resolve_device

        self.device = resolve_device(cfg.device)
        self.model_dir = self._policy_model()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = pad_id(self.tokenizer)
        self.reference = load_causal_lm(self.model_dir, device=self.device).requires_grad_(False)
        self.rm, self.normalizer, self.rm_stats = self._reward_model()
        # the reference's held-out answers, once: every version's win-rate is against these
        prompts = [p for p in self.heldout_prompts for _ in range(cfg.eval_samples)]
        self.reference_answers = sample(self.reference, self.tokenizer, prompts, cfg.max_new_tokens, seed=cfg.seed + 7)

    def _policy_model(self) -> Path:
        cfg = self.cfg
        if cfg.model == "toy":
            from rlhf.experiments.toy import build_toy_policy
            from rlhf.models import rlhf_home

            folder = rlhf_home() / "models" / f"toy-sft-seed{cfg.seed}-steps{cfg.sft_steps}"
            return build_toy_policy(
                folder,
                self.train_prompts + self.heldout_prompts,
                steps=cfg.sft_steps,
                seed=cfg.seed,
                progress=self.log,
                device=self.device,
            )
        from rlhf.models import resolve_model

        return Path(resolve_model(cfg.model))

    def rm_scores(self, samples: list[Sampled]) -> torch.Tensor:
        """Normalised r_φ (B,), as the reward service's Score returns them."""
        raw = self.rm.score([(("user", s.prompt),) for s in samples], [s.text for s in samples])
        return self.normalizer.normalize(raw)

    def _reward_model(self):
        from rlhf.reward import (
            Example,
            OnlineRewardTrainer,
            ScoreNormalizer,
            TrainerConfig,
            load_reward_model,
            resolve_backbone,
        )
        from rlhf.reward.data import PAIR

        cfg = self.cfg
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed)
        n_heldout = min(128, max(8, cfg.rm_pairs // 4))  # pairs held out to measure the RM
        n = cfg.rm_pairs + n_heldout
        prompts = [rng.choice(self.train_prompts) for _ in range(n)]
        a = sample(self.reference, self.tokenizer, prompts, cfg.max_new_tokens, seed=cfg.seed + 1)
        b = sample(self.reference, self.tokenizer, prompts, cfg.max_new_tokens, seed=cfg.seed + 2)
        pairs = []
        for p, x, y in zip(prompts, a, b):
            rx, ry = self.rater(p, x.text), self.rater(p, y.text)
            if rx == ry:
                continue  # the raters see no difference: no comparison to give
            chosen, rejected = (x, y) if rx > ry else (y, x)
            pairs.append(Example(PAIR, (("user", p),), chosen=chosen.text, rejected=rejected.text))
        train, heldout = pairs[:-n_heldout], pairs[-n_heldout:]
        self.log(
            f"[rm] {len(pairs)} rater comparisons from {n} answer pairs of π_ref "
            f"({len(train)} train, {len(heldout)} held out)"
        )
        torch.manual_seed(cfg.seed)
        model = load_reward_model(resolve_backbone(cfg.rm_backbone, policy_model=str(self.model_dir)), max_tokens=128)
        model.to(self.device)
        trainer = OnlineRewardTrainer(
            model, TrainerConfig(lr=cfg.rm_lr, train_batch_size=32, replay_ratio=0.0, seed=cfg.seed)
        )
        for epoch in range(cfg.rm_epochs):
            order = train[:]
            random.Random(cfg.seed + epoch).shuffle(order)
            steps = list(trainer.train(order))
            self.log(
                f"[rm] epoch {epoch + 1}/{cfg.rm_epochs}: loss {steps[-1]['loss']:.3f}, "
                f"progressive accuracy {sum(s['validation_accuracy'] for s in steps) / len(steps):.3f}"
            )
        model.eval()

        def agree(judge) -> float:
            right = 0
            chosen = model.score([e.prompt for e in heldout], [e.chosen for e in heldout])
            rejected = model.score([e.prompt for e in heldout], [e.rejected for e in heldout])
            for e, c, r in zip(heldout, chosen.tolist(), rejected.tolist()):
                truth = judge(e.prompt[0][1], e.chosen) - judge(e.prompt[0][1], e.rejected)
                right += (c - r) * truth > 0
            return right / len(heldout)

        # the scale PPO sees: standardised over π_ref's own answers, as the service's normaliser
        normalizer = ScoreNormalizer(window=1e9)
        normalizer.update(model.score([(("user", s.prompt),) for s in a], [s.text for s in a]))
        stats = {
            "rm_accuracy_rater": agree(self.rater),
            "rm_accuracy_oracle": agree(self.oracle),
            "rm_pairs": len(train),
            "rm_seconds": time.perf_counter() - t0,
        }
        self.log(
            f"[rm] held-out accuracy on the raters' labels {stats['rm_accuracy_rater']:.3f}, "
            f"agreement with the gold oracle {stats['rm_accuracy_oracle']:.3f} ({stats['rm_seconds']:.0f}s)"
        )
        return model, normalizer, stats


def run_beta(world: World, beta: float, log: Callable[[str], None]) -> dict:
    """Stage 3 for one β; returns the run's summary. Rows go to steps.jsonl / gate.jsonl."""
    from rlhf.learner.batch import collate
    from rlhf.learner.config import PPOConfig
    from rlhf.learner.drift import DriftGate
    from rlhf.learner.policy import build_policy
    from rlhf.learner.trainer import PPOTrainer
    from rlhf.learner.versions import verdict
    from rlhf.weightstore import WeightStore

    cfg, out = world.cfg, world.out
    toy = cfg.model == "toy"
    ppo = PPOConfig(
        finetune="full" if toy else "lora",
        batch_size=cfg.batch_size,
        minibatch_size=cfg.batch_size // 2,
        micro_batch_size=cfg.batch_size // 2,
        ppo_epochs=cfg.ppo_epochs,
        lr=cfg.lr,
        kl_coef=beta,
        adaptive_kl=False,
        seed=cfg.seed,
        objective=cfg.objective,
    )
    grouped = cfg.objective != "ppo"  # grpo/rloo: batch_size / group_size prompts × group_size answers
    torch.manual_seed(cfg.seed)
    policy = build_policy(world.model_dir, ppo, device=world.device)
    trainer = PPOTrainer(policy, ppo)
    tok = world.tokenizer
    gate = DriftGate(
        [prompt_ids(tok, p) for p in world.heldout_prompts],
        cfg.kl_budget,
        world.pad_id,
        tok.eos_token_id,
        max_new_tokens=cfg.max_new_tokens,
        samples_per_prompt=2,
        seed=cfg.seed + 3,
    )
    store = WeightStore(out.path(f"weights-beta-{beta:g}"))
    rng = random.Random(cfg.seed + 11)
    tag = f"β={beta:g}"
    served, version, last_good = 0, 0, 0
    t0 = time.perf_counter()

    def heldout_eval(lm) -> dict:
        prompts = [p for p in world.heldout_prompts for _ in range(cfg.eval_samples)]
        answers = sample(lm, tok, prompts, cfg.max_new_tokens, seed=cfg.seed + 9)
        ours = [world.oracle(a.prompt, a.text) for a in answers]
        theirs = [world.oracle(r.prompt, r.text) for r in world.reference_answers]
        return {
            "heldout_oracle": sum(ours) / len(ours),
            "win_rate": win_rate(ours, theirs),
            "heldout_words": sum(_words(a.text) for a in answers) / len(answers),
        }

    for step in range(1, cfg.steps + 1):
        # 1. rollouts: answers from π_θ, RM scores, reference log-probs
        if grouped:
            prompts = [
                p
                for p in (rng.choice(world.train_prompts) for _ in range(cfg.batch_size // cfg.group_size))
                for _ in range(cfg.group_size)
            ]
        else:
            prompts = [rng.choice(world.train_prompts) for _ in range(cfg.batch_size)]
        samples = sample(policy.causal_lm, tok, prompts, cfg.max_new_tokens)
        if grouped:
            for i, s in enumerate(samples):
                s.group_id = f"step{step}-g{i // cfg.group_size}"
        scores = world.rm_scores(samples)
        for s, sc in zip(samples, scores.tolist()):
            s.score, s.policy_version = sc, version
        fill_logprobs(policy, samples, world.pad_id)
        # 2. one PPO step (the learner's trainer: KL-penalised rewards, GAE, clipped losses)
        stats = trainer.step(collate(samples, world.pad_id))
        gold = [world.oracle(s.prompt, s.text) for s in samples]
        rated = [world.rater(s.prompt, s.text) for s in samples]
        row = {
            "beta": beta,
            "step": step,
            "objective": cfg.objective,
            "rm_score": stats["score_mean"],
            "kl": stats["kl"],
            "neg_beta_kl": -beta * stats["kl"],
            "total_reward": stats["score_mean"] - beta * stats["kl"],
            "oracle": sum(gold) / len(gold),
            "rater": sum(rated) / len(rated),
            "words": sum(_words(s.text) for s in samples) / len(samples),
            "keyword_rate": sum(oracle_fns.KEYWORD in oracle_fns.words(s.text) for s in samples) / len(samples),
            "entropy": stats["entropy"],
            "clipfrac": stats.get("clipfrac", 0.0),
            "served_version": served,
            "trained_version": version,
            "seconds": time.perf_counter() - t0,
        }
        # 3. a version every gate_every steps: the drift gate decides whether it is served
        if step % cfg.gate_every == 0:
            version += 1
            result = gate.check(policy)
            ev = heldout_eval(policy.causal_lm)
            store.put(
                version,
                policy.policy_state_dict(),
                fmt=policy.finetune,
                adapter_config=policy.adapter_config(),
                parent=version - 1,
                base_model=str(world.model_dir),
                meta=verdict(step, result),
            )
            if result.passed:
                served = last_good = version
            gate_row = {
                "beta": beta,
                "step": step,
                "version": version,
                "gate_kl": result.kl,
                "promoted": result.passed,
                "reason": result.reason,
                "served_version": served,
                **ev,
            }
            out.append("gate", gate_row)
            row.update(gate_kl=result.kl, served_version=served, trained_version=version, **ev)
            outcome = "promoted" if result.passed else f"REFUSED ({result.reason}); serving v{served}"
            log(
                f"[{tag}] step {step:>3}  v{version} gate KL {result.kl:.2f} → {outcome}; "
                f"held-out oracle {ev['heldout_oracle']:+.2f}, win-rate {ev['win_rate']:.2f}"
            )
        out.append("steps", row)
        if step % 5 == 0 or step == 1:
            log(
                f"[{tag}] step {step:>3}/{cfg.steps}  RM {row['rm_score']:+.2f}  KL {row['kl']:6.2f}  "
                f"total {row['total_reward']:+.2f}  oracle {row['oracle']:+.2f}  words {row['words']:5.1f}  "
                f"keyword {row['keyword_rate']:.2f}  ({row['seconds']:.0f}s)"
            )

    summary = {
        "beta": beta,
        "steps": cfg.steps,
        "final_versions": version,
        "served_version": served,
        "refused": sum(1 for g in out.read("gate") if g["beta"] == beta and not g["promoted"]),
        "seconds": time.perf_counter() - t0,
    }
    # 4. rollback to the last promoted version, as LearnerService.Rollback does
    if served != version:
        _, tensors = store.load(last_good) if last_good else (None, None)
        if tensors is None:  # nothing was ever promoted: the reference is the last good policy
            base = copy.deepcopy(build_policy(world.model_dir, ppo, device=world.device).policy_state_dict())
            policy.load_policy_state_dict(base)
        else:
            policy.load_policy_state_dict(tensors)
        trainer.reset_optimizer()
        result = gate.check(policy)
        ev = heldout_eval(policy.causal_lm)
        out.append(
            "gate",
            {
                "beta": beta,
                "step": cfg.steps,
                "version": last_good,
                "gate_kl": result.kl,
                "promoted": result.passed,
                "reason": "rollback",
                "served_version": last_good,
                **ev,
            },
        )
        log(
            f"[{tag}] rollback → v{last_good}: gate KL {result.kl:.2f} (budget {cfg.kl_budget}), "
            f"held-out oracle {ev['heldout_oracle']:+.2f}, win-rate {ev['win_rate']:.2f}"
        )
        summary["rollback"] = {"to_version": last_good, "gate_kl": result.kl, **ev}
    return summary


def run_sweep(cfg: SweepConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    from rlhf.models import set_torch_threads

    set_torch_threads(cfg.threads)
    wall = time.perf_counter()
    out = RunFolder(out_dir)
    for name in ("steps.jsonl", "gate.jsonl"):
        out.path(name).unlink(missing_ok=True)
    out.write_json("config.json", asdict(cfg))
    world = World(cfg, out, log)
    summaries = [run_beta(world, beta, log) for beta in cfg.betas]
    pngs = {}
    for beta in cfg.betas:
        pngs[f"{beta:g}"] = plot_beta(out, beta, cfg.kl_budget, out.path(f"kl-sweep-beta-{beta:g}.png"))
    pngs["all"] = plot_summary(out, cfg.betas, out.path("kl-sweep-summary.png"))
    wall = time.perf_counter() - wall
    device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
    out.path("kl-sweep.md").write_text(report(out, cfg, world.rm_stats, summaries, pngs, wall, device))
    result = {"out": str(out.root), "wall_seconds": wall, **world.rm_stats, "runs": summaries}
    out.write_json("summary.json", result)
    return result


def main_kl_sweep(args) -> int:
    from rlhf.experiments.sweep_config import config_from_args

    cfg = config_from_args(args)
    result = run_sweep(cfg, args.out, log=lambda m: print(m, flush=True))
    print(f"report: {Path(args.out) / 'kl-sweep.md'}")
    print(
        json.dumps(
            {
                "out": result["out"],
                "wall_seconds": round(result["wall_seconds"], 1),
                "runs": [{k: v for k, v in s.items() if k != "rollback"} for s in result["runs"]],
            }
        )
    )
    return 0
