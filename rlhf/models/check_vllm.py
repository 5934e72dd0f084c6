"""Check that a model folder (default: a fresh tiny model) loads and generates in vLLM.

    python -m rlhf.models.check_vllm [MODEL_DIR] [--max-tokens N] [--dtype D] [--compile]

Prints the engine load time, a greedy reply, and the largest gap between vLLM's log-probs
and ``sequence_logprobs`` (HF, fp32) on that reply; exits non-zero if vLLM fails. vLLM
starts its engine in a child process, hence the ``__main__`` guard: the child
re-imports the main module, and module-level code would run again there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="HF model folder; default: a tiny model")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="vLLM on CPU downcasts fp32 checkpoints to bf16 unless told")
    parser.add_argument(
        "--compile", action="store_true", help="let vLLM torch.compile the model (≈ 1 min more on 2 cores)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM reserves this many GiB of KV cache on CPU (its default is 4): keep it small here.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from rlhf.models.loading import (
        chat_prompt_ids,
        load_causal_lm,
        load_tokenizer,
        sequence_logprobs,
    )
    from rlhf.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_tiny_model(os.path.join(tmp, "tiny")))
        import vllm

        t0 = time.perf_counter()
        llm = vllm.LLM(model=model_dir, max_model_len=512, seed=0, dtype=args.dtype, enforce_eager=not args.compile)
        load_s = time.perf_counter() - t0
        tokenizer = load_tokenizer(model_dir)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = chat_prompt_ids(tokenizer, question)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0)
        gen_s = []  # first call includes one-time warm-up, second is steady state
        for _ in range(2):
            t0 = time.perf_counter()
            (result,) = llm.generate([vllm.TokensPrompt(prompt_token_ids=prompt)], params)
            gen_s.append(time.perf_counter() - t0)
        completion = result.outputs[0]
        print(f"vllm {vllm.__version__}: loaded {model_dir} in {load_s:.1f} s")
        print(
            f"generated {len(completion.token_ids)} tokens in {gen_s[0]:.2f} s "
            f"(again: {gen_s[1]:.2f} s): {completion.text!r}"
        )
        print(f"token ids: {list(completion.token_ids)}")
        vllm_logprobs = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        del llm
        # Ground truth: one HF forward pass over prompt + completion.
        model = load_causal_lm(model_dir)
        hf_logprobs = sequence_logprobs(model, prompt, list(completion.token_ids)).tolist()
        diff = max(abs(a - b) for a, b in zip(vllm_logprobs, hf_logprobs))
        print(f"max |logprob vLLM - HF| over the completion: {diff:.2e}")


if __name__ == "__main__":
    main()
