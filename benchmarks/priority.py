"""What request priority buys a person chatting while the rollout worker keeps the generator
busy: chat latency at priority 0 (what the gateway sends) against the same chat at the
background priority 10 (what it was before priorities existed: one queue, arrival order).

    .venv/bin/python benchmarks/priority.py                       # tiny random model, a minute
    .venv/bin/python benchmarks/priority.py --model demo --chats 6  # SmolLM2-135M, slower

The generator (transformers backend, `--max-batch` rows per batch) runs from its real
entrypoint. `--background` clients each send Generate(n=4, `--tokens` tokens, priority 10)
back to back, like rollout workers, so the queue holds more rows than one batch. Chats
(n=1, same length) then go one at a time, alternating priority 0 and 10, so both see the
same load; latency is client-side, call to answer. Priority only matters when the queue is
longer than a batch: with fewer background rows both columns are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation import Service, prompt_ids  # noqa: E402
from rlhf.priorities import BACKGROUND, INTERACTIVE  # noqa: E402


async def measure(address: str, prompts: list[list[int]], background: int, chats: int, tokens: int) -> dict:
    from rlhf.serving.client import aio_channel
    from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    def request(i: int, n: int, priority: int):
        return generation_pb2.GenerateRequest(
            prompt_token_ids=common_pb2.TokenIds(ids=prompts[i % len(prompts)]),
            params=generation_pb2.SamplingParams(
                n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, priority=priority
            ),
        )

    async with aio_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        stop = asyncio.Event()

        async def rollout_worker(w: int) -> None:
            i = w
            while not stop.is_set():
                await stub.Generate(request(i, 4, BACKGROUND), timeout=600)
                i += background

        workers = [asyncio.create_task(rollout_worker(w)) for w in range(background)]
        await asyncio.sleep(2.0)  # the queue fills
        latency: dict[int, list[float]] = {INTERACTIVE: [], BACKGROUND: []}
        for k in range(2 * chats):
            priority = INTERACTIVE if k % 2 == 0 else BACKGROUND
            t0 = time.perf_counter()
            await stub.Generate(request(1000 + k, 1, priority), timeout=600)
            latency[priority].append(time.perf_counter() - t0)
        stop.set()
        await asyncio.gather(*workers)
    return latency


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help='"tiny" (random, built here), "demo" (SmolLM2-135M) or a folder')
    ap.add_argument("--background", type=int, default=16, help="background clients, n=4 each")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer, chats and background alike")
    ap.add_argument("--chats", type=int, default=10, help="chats per priority")
    args = ap.parse_args()

    from rlhf.models import build_tiny_model, resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny") if args.model == "tiny" else resolve_model(args.model)
        prompts = prompt_ids(model)
        env = {"RLHF_MAX_BATCH": str(args.max_batch), "RLHF_MAX_N": "4"}
        with Service("transformers", model, work, env) as service:
            latency = asyncio.run(measure(service.spec.address, prompts, args.background, args.chats, args.tokens))

    def row(name: str, xs: list[float]) -> str:
        return (
            f"| {name} | {statistics.median(xs):.2f} | {max(xs):.2f} | "
            f"{statistics.median(xs) / statistics.median(latency[INTERACTIVE]):.1f}× |"
        )

    print(
        f"\nmodel={args.model} background={args.background}×n=4 (= {4 * args.background} rows queued) "
        f"max_batch={args.max_batch} tokens={args.tokens} chats={args.chats} per priority\n"
    )
    print("| chat sent with | p50 latency (s) | max (s) | vs priority 0 |")
    print("|---|---:|---:|---:|")
    print(row(f"priority {INTERACTIVE} (the gateway)", latency[INTERACTIVE]))
    print(row(f"priority {BACKGROUND} (one queue, arrival order)", latency[BACKGROUND]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
