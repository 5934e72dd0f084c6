"""PPO update throughput and peak memory: our learner vs TRL's PPOTrainer, same model,
batch and lengths, side by side in one run.

    .venv/bin/python benchmarks/learner.py                      # tiny model, CPU
    .venv/bin/python benchmarks/learner.py --model smollm2-135m --device cuda --prompt-len 128 --response-len 128

Each implementation runs in its own subprocess (a fair peak-memory reading) on random
prompts of exactly --prompt-len tokens with responses of exactly --response-len tokens
(no stop token). TRL runs from `.venv-bench` (TRL 1.12.0, the last release with a
PPOTrainer; see docs/learner.md), or any python given with --trl-python.

What is timed, per update, after --warmup updates:
  ours  PPOTrainer.step: the no-grad log-prob/value pass, rewards, GAE and K epochs
  TRL   from the first training forward to the last optimizer step of the update (its
        log-prob/value/reference/reward passes and generation happen before and are not
        timed, so the comparison favours TRL)
tokens/s = batch × (prompt + response) × epochs / update seconds. Peak memory: CUDA
max_memory_allocated within the update, or on CPU the largest RSS sampled (every 5 ms)
within it; `process peak` is the whole process's high-water mark (TRL also holds the
reference, reward and value models there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(  # SmolLM2-135M's architecture; weights random (throughput does not care)
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
)


# --- measurement helpers (both children) ------------------------------------------------


class PeakMemory:
    """Peak bytes between start() and stop(): CUDA allocator stats, or sampled RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        import torch

        self.peak = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self._stop.clear()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.rss())


def process_peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare_model(kind: str, out: Path) -> Path:
    """A model folder with the real SmolLM2 tokenizer: the tiny test model, or SmolLM2-135M's
    shape with random weights (nothing downloaded)."""
    import torch
    import transformers

    from rlhf.models import load_tokenizer, smollm2_tokenizer_dir
    from rlhf.models.tiny import build_tiny_model

    if kind == "tiny":
        return build_tiny_model(out)
    if kind != "smollm2-135m":
        return Path(kind)
    tok = load_tokenizer(smollm2_tokenizer_dir())
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
        **SMOLLM2_135M,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_prompts(n: int, length: int, vocab: int, avoid: set[int], seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append([3 if i in avoid else i for i in ids])
    return out


# --- ours ------------------------------------------------------------------------------


def run_ours(args) -> dict:
    import torch

    from rlhf.learner import PPOConfig, PPOTrainer, build_policy
    from rlhf.learner.batch import collate
    from rlhf.models import load_tokenizer
    from rlhf.testing.rollouts import sample_rollouts

    device = args.device
    tok = load_tokenizer(args.model_dir)
    cfg = PPOConfig(
        finetune=args.finetune,
        batch_size=args.batch_size,
        minibatch_size=args.minibatch_size,
        micro_batch_size=args.micro_batch_size,
        ppo_epochs=args.ppo_epochs,
        lr=1e-6,
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    policy = build_policy(args.model_dir, cfg, device)
    trainer = PPOTrainer(policy, cfg)
    prompts = random_prompts(args.batch_size, args.prompt_len, len(tok), {tok.pad_token_id, tok.eos_token_id})
    times, peaks = [], []
    for update in range(args.warmup + args.updates):
        # rollouts from the current policy (not timed; the rollout service does this in the loop)
        rollouts = sample_rollouts(
            policy.causal_lm,
            policy.causal_lm,
            prompts,
            lambda r: float(len(r) % 2),
            policy_version=0,
            max_new_tokens=args.response_len,
            min_new_tokens=args.response_len,
            pad_id=tok.pad_token_id,
            eos_id=None,
            seed=update,
            make_event=SimpleNamespace,
        )
        batch = collate(rollouts, tok.pad_token_id)
        memory = PeakMemory(device)
        memory.start()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = memory.stop()
        if update >= args.warmup:
            times.append(elapsed)
            peaks.append(peak)
    return {"update_seconds": times, "update_peak_bytes": max(peaks), "process_peak_bytes": process_peak_bytes(device)}


# --- TRL -------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.models import load_tokenizer

    device = args.device
    tok = load_tokenizer(args.model_dir)
    n_updates = args.warmup + args.updates
    prompts = random_prompts(args.batch_size, args.prompt_len, len(tok), {tok.pad_token_id, tok.eos_token_id})
    dataset = Dataset.from_dict({"input_ids": prompts * n_updates})
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=dtype)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        )
        ref = None
    assert args.minibatch_size == args.batch_size, "TRL steps once per minibatch only when it is the batch"
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        num_mini_batches=1,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.response_len,
        local_rollout_forward_batch_size=args.batch_size,
        total_episodes=args.batch_size * n_updates,
        stop_token=None,
        missing_eos_penalty=None,
        num_sample_generations=0,
        learning_rate=1e-6,
        bf16=args.bf16,
        use_cpu=not device.startswith("cuda"),
        logging_steps=10_000,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        peft_config=peft_config,
    )

    memory = PeakMemory(device)
    marks: dict = {"start": None, "end": None}
    times, peaks = [], []

    def cuda_sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def on_train_forward(module, inputs) -> None:  # the policy+value wrapper runs only in the update
        if marks["start"] is None:
            cuda_sync()
            memory.start()
            marks["start"] = time.perf_counter()

    def on_optimizer_step(optimizer, *a, **kw) -> None:
        cuda_sync()
        marks["end"] = time.perf_counter()

    class UpdateDone(TrainerCallback):
        def on_step_end(self, *a, **kw):
            times.append(marks["end"] - marks["start"])
            peaks.append(memory.stop())
            marks["start"] = None

    trainer.model.register_forward_pre_hook(on_train_forward)
    # the torch optimizer inside accelerate's wrapper: it steps only on accumulation boundaries
    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_post_hook(on_optimizer_step)
    trainer.add_callback(UpdateDone())
    trainer.train()
    return {
        "update_seconds": times[args.warmup :],
        "update_peak_bytes": max(peaks[args.warmup :]),
        "process_peak_bytes": process_peak_bytes(device),
        "trl_version": trl.__version__,
    }


# --- driver ----------------------------------------------------------------------------


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = run_ours(args) if args.child == "ours" else run_trl(args)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help='"tiny", "smollm2-135m" (random weights) or a model folder')
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--finetune", default="full", choices=["full", "lora"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--updates", type=int, default=3, help="timed updates")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--impl", default="both", choices=["ours", "trl", "both"])
    p.add_argument(
        "--trl-python", default=str(ROOT / ".venv-bench" / "bin" / "python"), help="python that has trl installed"
    )
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.minibatch_size = args.batch_size
    if args.child:
        child(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        model_dir = prepare_model(args.model, Path(tmp) / "model")
        passthrough = [a for a in sys.argv[1:] if not a.startswith("--impl") and a not in ("ours", "trl", "both")]
        results = {}
        for impl in ["ours", "trl"] if args.impl == "both" else [args.impl]:
            python = args.trl_python if impl == "trl" else sys.executable
            cmd = [python, __file__, *passthrough, "--child", impl, "--model-dir", str(model_dir)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{impl} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
                return 1
            results[impl] = json.loads(line[len("RESULT ") :])

    tokens = args.batch_size * (args.prompt_len + args.response_len) * args.ppo_epochs
    print(
        f"\nPPO update: model={args.model} device={args.device} finetune={args.finetune} "
        f"batch={args.batch_size} micro={args.micro_batch_size} prompt={args.prompt_len} "
        f"response={args.response_len} epochs={args.ppo_epochs} bf16={args.bf16} "
        f"(median of {args.updates} updates after {args.warmup} warm-up)\n"
    )
    print("| impl | update s | tokens/s | update peak MiB | process peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for impl, r in results.items():
        seconds = statistics.median(r["update_seconds"])
        name = f"TRL {r['trl_version']} PPOTrainer" if impl == "trl" else "ours (rlhf.learner)"
        print(
            f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {r['update_peak_bytes'] / 2**20:,.0f} "
            f"| {r['process_peak_bytes'] / 2**20:,.0f} |"
        )
        r["tokens_per_second"] = tokens / seconds
    if len(results) == 2:
        print(
            f"\nours / TRL tokens/s: {results['ours']['tokens_per_second'] / results['trl']['tokens_per_second']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
