"""What a person chatting waits while the rollout worker keeps the generator busy: chat
latency at priority 0 (what the gateway sends) against the same chat at the background
priority 10 (one queue, arrival order) and against the same chat on an idle generator, for
static batching, continuous batching, and continuous batching with pre-emption (rollout rows
parked while a chat decodes), side by side in one run.

    .venv/bin/python benchmarks/priority.py                       # tiny random model, minutes
    .venv/bin/python benchmarks/priority.py --model demo --chats 6  # SmolLM2-135M, slower

For each `--batching` mode a generator (transformers backend, `--max-batch` rows) runs from
its real entrypoint. First `--chats` chats go one at a time to the idle generator (the idle
latency). Then `--background` clients each send Generate(n=4, `--tokens` tokens, priority
10) back to back, like rollout workers, so the queue holds more rows than one batch (16 × 4
rows with `--max-batch 8`: 8 batches deep). Chats (n=1, same length) then go one at a time,
alternating priority 0 and 10, so both see the same load; latency is client-side, call to
answer; p99 is the nearest rank. With static batches a chat waits at least for the batch in
flight; with continuous batching it joins at the first free slot; with pre-emption the
rollout rows step aside while it decodes. What the rollouts pay for it: their tokens per
second while the chats run (every background call that ends in the chat phase, counted
whole), and the peak RSS of each generator (its process tree, /proc VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation import Service, prompt_ids  # noqa: E402
from rlhf.priorities import BACKGROUND, INTERACTIVE  # noqa: E402

MODES = {  # mode → generator settings
    "static": {"RLHF_BATCHING": "static", "RLHF_PREEMPTION": "off"},
    "continuous": {"RLHF_BATCHING": "continuous", "RLHF_PREEMPTION": "off"},
    "continuous+preemption": {"RLHF_BATCHING": "continuous", "RLHF_PREEMPTION": "on"},
}


async def measure(
    address: str, prompts: list[list[int]], background: int, chats: int, tokens: int, fifo_chats: int
) -> dict:
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
        counting = asyncio.Event()  # set while the chats run: rollout tokens that end then count
        rollout_tokens = [0]

        async def rollout_worker(w: int) -> None:
            i = w
            while not stop.is_set():
                r = await stub.Generate(request(i, 4, BACKGROUND), timeout=600)
                if counting.is_set() and not stop.is_set():
                    rollout_tokens[0] += r.usage.completion_tokens
                i += background

        idle = []
        for k in range(chats):
            t0 = time.perf_counter()
            await stub.Generate(request(2000 + k, 1, INTERACTIVE), timeout=600)
            idle.append(time.perf_counter() - t0)
        workers = [asyncio.create_task(rollout_worker(w)) for w in range(background)]
        await asyncio.sleep(2.0)  # the queue fills
        latency: dict[int, list[float]] = {INTERACTIVE: [], BACKGROUND: []}
        order = []  # alternating, so both priorities see the same load
        for k in range(max(chats, fifo_chats)):
            order += [INTERACTIVE] * (k < chats) + [BACKGROUND] * (k < fifo_chats)
        counting.set()
        t_chats = time.perf_counter()
        for k, priority in enumerate(order):
            t0 = time.perf_counter()
            await stub.Generate(request(1000 + k, 1, priority), timeout=900)
            latency[priority].append(time.perf_counter() - t0)
        phase_s = time.perf_counter() - t_chats
        stop.set()
        await asyncio.gather(*workers)
    return latency | {"idle": idle, "rollout_tok_s": rollout_tokens[0] / phase_s}


def p99(xs: list[float]) -> float:
    return sorted(xs)[max(0, math.ceil(0.99 * len(xs)) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help='"tiny" (random, built here), "demo" (SmolLM2-135M) or a folder')
    ap.add_argument("--background", type=int, default=16, help="background clients, n=4 each")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer, chats and background alike")
    ap.add_argument("--chats", type=int, default=10, help="chats at priority 0 per mode (and idle)")
    ap.add_argument("--fifo-chats", type=int, default=None, help="chats at priority 10 per mode (default: --chats)")
    ap.add_argument(
        "--batching", default=",".join(MODES), help=f"modes to compare, comma-separated, of {', '.join(MODES)}"
    )
    args = ap.parse_args()
    fifo_chats = args.chats if args.fifo_chats is None else args.fifo_chats

    from rlhf.models import build_tiny_model, resolve_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny") if args.model == "tiny" else resolve_model(args.model)
        prompts = prompt_ids(model)
        for mode in args.batching.split(","):
            env = {"RLHF_MAX_BATCH": str(args.max_batch), "RLHF_MAX_N": "4", **MODES[mode]}
            with Service("transformers", model, work, env, name=mode.replace("+", "-")) as service:
                results[mode] = asyncio.run(
                    measure(service.spec.address, prompts, args.background, args.chats, args.tokens, fifo_chats)
                )
            results[mode]["rss_mb"] = service.peak_rss_mb
            shown = {
                k: [round(x, 2) for x in v] if isinstance(v, list) else round(v, 1) for k, v in results[mode].items()
            }
            print(f"{mode}: {shown}", flush=True)

    print(
        f"\nmodel={args.model} background={args.background}×n=4 (= {4 * args.background} rows queued) "
        f"max_batch={args.max_batch} tokens={args.tokens} chats={args.chats} at priority 0, "
        f"{fifo_chats} at priority 10\n"
    )
    print(
        "| batching | idle chat p50 (s) | chat p50, priority 0 (s) | p99 (s) | p50 / idle "
        "| priority 10 p50 (s) | p99 (s) | rollout tok/s during chats | generator peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, lat in results.items():
        idle, chat, bg = (statistics.median(lat["idle"]), lat[INTERACTIVE], lat[BACKGROUND])
        fifo = f"{statistics.median(bg):.2f} | {p99(bg):.2f}" if bg else "– | –"
        print(
            f"| {mode} | {idle:.2f} | {statistics.median(chat):.2f} | {p99(chat):.2f} | "
            f"{statistics.median(chat) / idle:.1f}× | {fifo} | {lat['rollout_tok_s']:.1f} | {lat['rss_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
