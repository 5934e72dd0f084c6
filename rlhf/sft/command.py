"""The `rlhf sft` and `rlhf export` command lines: flags, and errors as one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def sft_arguments(p: argparse.ArgumentParser) -> None:
    from rlhf.sft.config import SFTConfig

    d = SFTConfig()
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data",
        default=None,
        help='chat JSONL ({"messages": [...]} per line), or "demo": the shipped set (the default)',
    )
    src.add_argument(
        "--from-feedback",
        action="store_true",
        help="examples from the gateway's outbox in --state-dir: thumbs-up answers, preferred answers, "
        "corrected_answer",
    )
    p.add_argument(
        "--state-dir", default=None, help="with --from-feedback: the stack's state dir (default $RLHF_HOME/state)"
    )
    p.add_argument(
        "--outbox", default=None, help="with --from-feedback: the outbox file (default <state-dir>/gateway/outbox.db)"
    )
    p.add_argument(
        "--topic-prefix", default=os.environ.get("RLHF_TOPIC_PREFIX", "rlhf"), help="the stack's topic prefix"
    )
    p.add_argument("--model", default="demo", help='base model: "demo" (SmolLM2-135M-Instruct) or a model folder')
    p.add_argument("--out", required=True, help="the model folder to write (a rerun with the same --out resumes)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all (more than done: resume)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter, merged into the written weights")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 with --lora, 2e-5 full)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="share of examples held out")
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between held-out losses (0: start and end)"
    )
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument("--max-length", type=int, default=d.max_length, help="longest tokenised conversation kept")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out split, data order, LoRA init")
    p.add_argument(
        "--greedy-tokens",
        type=int,
        default=48,
        help="length of the before/after greedy answer printed at the end (0: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_sft(args) -> int:
    from rlhf.models.prepare import greedy_reply, resolve_model
    from rlhf.sft.config import SFTConfig
    from rlhf.sft.data import SFTDataError, describe_feedback, outbox_path, read_feedback, read_jsonl, resolve_data
    from rlhf.sft.train import run_sft

    def say(message: str) -> None:
        print(message, flush=True)

    try:
        for name in ("steps", "batch_size", "lora_r", "max_length"):
            if getattr(args, name) < 1:
                raise SFTDataError(f"--{name.replace('_', '-')}: must be ≥ 1, got {getattr(args, name)}")
        if not 0 <= args.eval_fraction < 1:
            raise SFTDataError(f"--eval-fraction: must be in [0, 1), got {args.eval_fraction}")
        if args.from_feedback:
            from rlhf.serving.settings import default_state_dir

            outbox = Path(args.outbox) if args.outbox else outbox_path(args.state_dir or default_state_dir())
            examples, counts = read_feedback(outbox, args.topic_prefix)
            say(describe_feedback(counts, outbox))
            if not examples:
                raise SFTDataError(
                    f"no SFT examples in {outbox}: no thumbs-up, preferred or corrected answer yet "
                    "(the outbox keeps events for the gateway's outbox_retention_seconds)"
                )
            label = f"feedback in {outbox}"
        else:
            path = resolve_data(args.data or "demo")
            examples, label = read_jsonl(path), str(path)
        base = resolve_model(args.model)
        cfg = SFTConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            lora=args.lora,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            eval_fraction=args.eval_fraction,
            eval_every=args.eval_every,
            save_every=args.save_every,
            max_length=args.max_length,
            seed=args.seed,
        )
        result = run_sft(examples, base, Path(args.out), cfg, label, say=say, progress_bar=not args.no_progress)
    except (SFTDataError, FileNotFoundError) as e:
        print(f"rlhf sft: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.greedy_tokens and not result.done_already:
        question = next((ex.messages[0][1] for ex in result.held_out + examples if ex.messages[0][0] == "user"), None)
        if question:
            say(f"greedy answer to {question!r}:")
            say(f"  before: {greedy_reply(base, question, args.greedy_tokens)!r}")
            say(f"  after:  {greedy_reply(result.out, question, args.greedy_tokens)!r}")
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=None,
        help="the stack's state dir, whose weights/ is the weight store (default $RLHF_HOME/state)",
    )
    p.add_argument("version", type=int, help="policy version in the weight store")
    p.add_argument("out", help="the model folder to write (replaced if it exists)")
    p.add_argument(
        "--base-model",
        default=None,
        help="the folder the learner started from (default: the one the version's manifest names)",
    )


def main_export(args) -> int:
    from rlhf.models.export import ExportError, export_version
    from rlhf.serving.settings import default_state_dir

    try:
        out = export_version(args.state_dir or default_state_dir(), args.version, Path(args.out), args.base_model)
    except ExportError as e:
        print(f"rlhf export: {e}", file=sys.stderr, flush=True)
        return 1
    import json

    from rlhf.models.export import INFO_FILE

    info = json.loads((out / INFO_FILE).read_text())
    print(f"version {args.version} written to {out} (transformers, vLLM, rlhf up --model {out})", flush=True)
    if not info["promoted"]:
        why = info["meta"].get("reason") or "no promoted flag in its manifest"
        print(f"note: version {args.version} was not promoted, generators never served it ({why})", flush=True)
    return 0
