"""Chat latency and throughput with one version vs two versions served at once (issue 15).

    .venv/bin/python benchmarks/canary_serving.py                  # demo model (SmolLM2-135M), transformers
    .venv/bin/python benchmarks/canary_serving.py --model tiny --rounds 1   # a smoke run
    .venv/bin/python benchmarks/canary_serving.py --backends transformers,vllm   # vLLM multi-LoRA too

The same batch both ways: `--prompts` (16) chat prompts of the bundled prompt set, sent at
once as concurrent `Generator.generate` calls in this process (no gRPC: the engine's cost is
measured, not the transport), each asking for exactly `--tokens` (64) new tokens
(ignore_eos, temperature 1, seeded). The candidate is a rank-16 LoRA on q/k/v/o (the learner's
default targets) with random A and B (`rlhf.testing.lora.make_random_lora`, init_scale 0.05:
random, not trained; the cost does not depend on the values).

- **one version**: the stable version alone (no candidate loaded);
- **two versions**: the candidate loaded beside it, every other request naming it
  (`version=`), so half the rows of the same batch run the candidate: transformers adds the
  adapter per row in the same forward pass (rlhf/generation/adapters.py), vLLM batches two
  LoRA adapters (the stable version is then a LoRA too: vLLM serves LoRA versions as adapters).

Throughput is all completion tokens over the time from the first call to the last answer;
latency is each request's own time; the two set-ups alternate within each round (which goes
first alternates too) so both see the same machine load, and each figure is the median over
rounds. The cost of the second
version is the drop in throughput, in % of the one-version figure (target ≤ 10 %).

`--sections forward` times one decode-shaped forward pass of the transformers model alone
(`--prompts` rows × 1 token, no KV cache), no adapter vs half the rows on the candidate vs
the same with the rows gathered instead of masked (index_select of the candidate's rows,
index_add_ of their product), interleaved `--forward-iters` times: the adapter's own cost, without the
engine around it.

    .venv/bin/python benchmarks/canary_serving.py --sections forward
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATE = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


async def one_batch(gen, prompts: list[list[int]], sampling, versions: list[int]) -> tuple[float, list[float], int]:
    """(wall seconds, per-request seconds, completion tokens) of the prompts sent at once."""

    async def request(i: int) -> tuple[float, int]:
        start, n = time.perf_counter(), 0
        async with aclosing(gen.generate(prompts[i], sampling, f"r{i}", stream=False, version=versions[i])) as s:
            async for version, d in s:
                assert version == (versions[i] or gen.version), (version, versions[i])
                n += len(d.token_ids)
        return time.perf_counter() - start, n

    start = time.perf_counter()
    done = await asyncio.gather(*(request(i) for i in range(len(prompts))))
    wall, n = time.perf_counter() - start, sum(n for _, n in done)
    two = sum(1 for v in versions if v)
    print(f"  {len(prompts)} requests, {two} on the candidate: {n / wall:.1f} tok/s", file=sys.stderr, flush=True)
    return wall, [t for t, _ in done], n


async def bench_backend(name: str, model_dir: Path, store_root: Path, work: Path, prompts, args) -> dict:
    from rlhf.generation import Generator, Limits, Sampling, make_backend

    backend = make_backend(
        name, model_dir, max_model_len=1024, max_batch=max(32, len(prompts)), device=args.device, max_lora_rank=16
    )
    gen = Generator(backend, model_dir, Limits(max_model_len=1024, max_max_tokens=args.tokens), store_root, work)
    await gen.start()
    try:
        if name == "vllm":
            await gen.load_version(1)  # the stable version as a LoRA adapter too (vLLM serves LoRA versions so)
        sampling = Sampling(temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
        await one_batch(gen, prompts[:2], sampling, [0, 0])  # warm-up
        results: dict[str, list[tuple[float, list[float], int]]] = {"one": [], "two": []}
        half = [CANDIDATE if i % 2 else 0 for i in range(len(prompts))]
        for r in range(args.rounds):
            for mode in ("one", "two") if r % 2 == 0 else ("two", "one"):  # alternate which goes first
                if mode == "one":
                    results["one"].append(await one_batch(gen, prompts, sampling, [0] * len(prompts)))
                else:
                    await gen.load_candidate(CANDIDATE)
                    results["two"].append(await one_batch(gen, prompts, sampling, half))
                    await gen.drop_candidate("benchmark round over")
        out = {
            mode: {
                "tokens_per_s": statistics.median(n / wall for wall, _, n in runs),
                "p50_latency_s": statistics.median(statistics.median(lat) for _, lat, _ in runs),
                "p90_latency_s": statistics.median(sorted(lat)[int(0.9 * (len(lat) - 1))] for _, lat, _ in runs),
            }
            for mode, runs in results.items()
        }
        # the cost within each round (its two arms ran back to back, under the same load)
        out["paired_costs"] = [
            100 * (1 - (n2 / w2) / (n1 / w1)) for (w1, _, n1), (w2, _, n2) in zip(results["one"], results["two"])
        ]
        return out
    finally:
        await gen.stop()


def forward_cost(model_dir: Path, work: Path, rows: int, iters: int) -> None:
    """One decode-shaped forward (`rows` rows × 1 token, no cache) of the transformers model,
    with no adapter vs half the rows on the rank-16 candidate adapter, interleaved."""
    import torch

    from rlhf.generation.adapters import RowAdapters
    from rlhf.generation.weights import check_lora, lora_factors, safetensors_files, tensor_shapes
    from rlhf.models import load_causal_lm

    folder = work / f"lora{CANDIDATE}"
    spec = check_lora(folder, tensor_shapes(safetensors_files(model_dir)), 16)
    model = load_causal_lm(model_dir).eval()
    adapters = RowAdapters.of(model)
    k = adapters.add(lora_factors(folder, spec))
    ids = torch.randint(0, 1000, (rows, 1))
    half = torch.tensor([k if i % 2 else 0 for i in range(rows)])
    # the other formulation, for comparison: gather the candidate's rows, add their product back
    # in place (less arithmetic, but two copies per hooked layer; measured slower on CPU)
    idx = (half == k).nonzero()[:, 0]
    gathered_on = [False]

    def gathered_hook(module: str):
        def hook(_mod, args, out):
            if not gathered_on[0]:
                return None
            a_t, b_t = adapters._live[k][module]
            return out.index_add_(0, idx, (args[0].index_select(0, idx) @ a_t) @ b_t)

        return hook

    adapters.apply_pending()
    handles = [adapters.modules[m].register_forward_hook(gathered_hook(m)) for m in adapters._live[k]]
    times: dict[str, list[float]] = {"one": [], "two": [], "gathered": []}
    with torch.inference_mode():
        for _ in range(iters):
            for mode, which in (("one", None), ("two", half), ("gathered", None)):
                gathered_on[0] = mode == "gathered"
                start = time.perf_counter()
                with adapters.rows(which):
                    model(input_ids=ids)
                times[mode].append(time.perf_counter() - start)
    for h in handles:
        h.remove()
    threads = torch.get_num_threads()
    print(f"\none forward, {rows} rows × 1 token, {iters} interleaved repeats, {threads} torch threads\n")
    print("| versions served | min (ms) | median (ms) | cost (min) |")
    print("|---|---:|---:|---:|")
    labels = {
        "one": "one",
        "two": "two (half the rows on the candidate; 0/1 row mask, the hooks' formulation)",
        "gathered": "two, the candidate's rows gathered (index_select, index_add_)",
    }
    one = min(times["one"])
    for mode, ts in times.items():
        cost = "" if mode == "one" else f"{100 * (min(ts) / one - 1):+.1f} %"
        print(f"| {labels[mode]} | {1000 * min(ts):.1f} | {1000 * statistics.median(ts):.1f} | {cost} |")
    print(f"\nload average {loadavg()}")


def loadavg() -> str:
    """The 1/5/15-minute load average: the figures mean little on a machine busy with other work."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help='"demo" (SmolLM2-135M-Instruct), "tiny", or a folder')
    ap.add_argument("--backends", default="transformers")
    ap.add_argument("--device", default="auto", help="transformers backend device")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sections", default="batch", help="batch (the table above), forward (one forward pass)")
    ap.add_argument("--forward-iters", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    from rlhf.models import build_tiny_model, chat_prompt_ids, load_tokenizer, resolve_model
    from rlhf.rollout import TRAIN, load_prompts
    from rlhf.testing.lora import make_random_lora
    from rlhf.weightstore import WeightStore

    model_dir = build_tiny_model(work / "tiny") if args.model == "tiny" else resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    records = load_prompts(TRAIN)
    prompts = [chat_prompt_ids(tok, records[i % len(records)]["messages"]) for i in range(args.prompts)]
    store = WeightStore(work / "weights")
    for version, seed in [(1, 1), (CANDIDATE, 2)]:
        tensors, cfg = make_random_lora(
            model_dir, work / f"lora{version}", rank=16, alpha=16, seed=seed, target_modules=TARGETS, init_scale=0.05
        )
        store.put(version, tensors, fmt="lora", adapter_config=cfg, meta={"promoted": True})
    print(
        f"model {model_dir.name} · {args.prompts} chat requests × {args.tokens} new tokens in one batch · "
        f"candidate: rank-16 LoRA on {'/'.join(t.removesuffix('_proj') for t in TARGETS)} (random A, B) · "
        f"median of {args.rounds} rounds · {os.cpu_count()} CPUs · load average {loadavg()}\n"
    )
    if "forward" in args.sections.split(","):
        forward_cost(model_dir, work, args.prompts, args.forward_iters)
    if "batch" not in args.sections.split(","):
        return
    print("| backend | versions served | completion tokens/s | p50 latency (s) | p90 latency (s) | cost |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.backends.split(","):
        r = asyncio.run(bench_backend(name, model_dir, store.root, work / f"gen-{name}", prompts, args))
        one, two = r["one"], r["two"]
        cost = 100 * (1 - two["tokens_per_s"] / one["tokens_per_s"])
        print(
            f"| {name} | one | {one['tokens_per_s']:.1f} | {one['p50_latency_s']:.2f} | {one['p90_latency_s']:.2f} | |"
        )
        print(
            f"| {name} | two (half the rows on the candidate) | {two['tokens_per_s']:.1f} | "
            f"{two['p50_latency_s']:.2f} | {two['p90_latency_s']:.2f} | {cost:+.1f} % |"
        )
        paired = ", ".join(f"{c:+.1f}" for c in r["paired_costs"])
        print(f"\n{name}: cost per round, its two arms back to back: {paired} % · load average {loadavg()}")


if __name__ == "__main__":
    main()
