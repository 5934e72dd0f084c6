"""A toy chat policy for experiments on CPU: a tiny Llama, supervised-fine-tuned in seconds.

InstructGPT's stage 1 (SFT) in miniature: a tiny random `LlamaForCausalLM` with the real
SmolLM2 tokenizer and chat template learns to answer the training prompts with short
sentences of plain words, sometimes containing the keyword, 3–10 words long, then
`<|im_end|>`. That gives PPO a policy with a real length distribution and a real
keyword rate to move — the two things the kl-sweep's oracle and raters care about —
at a cost of milliseconds per step instead of SmolLM2-135M's seconds.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf.experiments.oracles import KEYWORD

# plain, common words; each is one or two SmolLM2 tokens
VOCAB = (
    "the a model answer river mountain blue green quick slow data train music paper light "
    "window garden city coffee morning evening table chair book story simple clear small large "
    "idea number water stone cloud winter summer road bridge market voice friend "
    "little bright quiet early late open close run walk read write build find keep think"
).split()


def toy_response(rng: random.Random, keyword_rate: float = 0.25, min_words: int = 3, max_words: int = 10) -> str:
    ws = [rng.choice(VOCAB) for _ in range(rng.randint(min_words, max_words))]
    if rng.random() < keyword_rate:
        ws[rng.randrange(len(ws))] = KEYWORD
    return " ".join(ws).capitalize() + "."


@dataclass
class _Pair:
    """What rlhf.learner.batch.collate reads from a rollout, for supervised pairs."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    score: float = 0.0
    policy_version: int = 0

    @property
    def logprobs(self) -> list[float]:
        return [0.0] * len(self.response_token_ids)

    ref_logprobs = logprobs


def build_toy_policy(
    out_dir: str | Path,
    prompts: list[str],
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
) -> Path:
    """SFT a tiny Llama on toy answers to `prompts`; save it (with tokenizer) to out_dir.
    Idempotent: an existing complete folder is reused."""
    from rlhf.learner.batch import collate
    from rlhf.learner.policy import response_logits
    from rlhf.models import build_tiny_model, chat_prompt_ids, load_causal_lm, load_tokenizer, pad_id
    from rlhf.ppo import logprobs_from_logits, masked_mean

    out = Path(out_dir)
    if (out / "toy-sft.done").exists():
        return out
    t0 = time.perf_counter()
    build_tiny_model(out, num_layers=num_layers, hidden_size=hidden_size, seed=seed, intermediate_size=4 * hidden_size)
    tok = load_tokenizer(out)
    model = load_causal_lm(out, device=device).train()
    eos = tok.eos_token_id
    prompt_ids = [chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        rows = []
        for _ in range(batch_size):
            r = tok(toy_response(rng), add_special_tokens=False)["input_ids"] + [eos]
            rows.append(_Pair(prompt_ids[rng.randrange(len(prompt_ids))], r))
        batch = collate(rows, pad_id=pad_id(tok)).to(device)
        # logits only where the loss is (the answer): the 49k-vocabulary head is the cost
        logits, _ = response_logits(
            model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width, batch.response_width
        )  # (B, R, V)
        nll = -logprobs_from_logits(logits, batch.response_ids)  # (B, R)
        loss = masked_mean(nll, batch.response_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            progress(f"[toy sft] step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval().cpu()
    model.save_pretrained(out)
    (out / "toy-sft.done").write_text(f"{steps} steps in {time.perf_counter() - t0:.1f}s\n")
    progress(f"[toy sft] done in {time.perf_counter() - t0:.1f}s → {out}")
    return out
