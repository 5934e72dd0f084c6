"""Where the vLLM service's time goes next to raw `LLM.generate`: CPU seconds per process
and per thread during each arm, on one machine, arms interleaved.

    .venv/bin/python benchmarks/vllm_overhead.py --rounds 3            # demo model (SmolLM2-135M)
    .venv/bin/python benchmarks/vllm_overhead.py --model tiny --rounds 1

Runs the same 16 prompts × 64 tokens as `benchmarks/generation.py` (its `RawVllm` and
`Service`), alternating raw and service rounds. For each round it reads, from /proc, the
CPU time (user + system) of every thread of every process involved — this process (the
raw engine's front end and the gRPC client), the service's main process, and each engine
core — so the table shows which process and thread spent the CPU that the 2 cores did not
have for the engine's forward passes. With `--py-spy PATH` it also records the service's
main process (all threads, idle frames left out) for one service round and prints its
top frames.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation import (  # noqa: E402
    N_PROMPTS,
    NEW_TOKENS,
    RawVllm,
    Service,
    process_tree,
    prompt_ids,
    vllm_engine_kwargs,
)

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: list[int]) -> dict[tuple[int, str], float]:
    """CPU seconds so far of every thread of `pids`, keyed by (pid, thread name)."""
    out: dict[tuple[int, str], float] = defaultdict(float)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[(pid, name)] += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return out


def diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--py-spy", default="", help="path of a py-spy binary: record the service for one round")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf.models import build_tiny_model, resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-overhead-"))
    try:
        model_dir = build_tiny_model(work / "tiny") if args.model == "tiny" else resolve_model(args.model)
        prompts = prompt_ids(model_dir)
        env = {"RLHF_MAX_MODEL_LEN": "2048", "RLHF_MAX_BATCH": "32"}
        env |= dict(kv.split("=", 1) for kv in args.env)
        with Service("vllm", model_dir, work, env) as service:
            raw = RawVllm(model_dir, vllm_engine_kwargs(model_dir, enforce_eager=True))
            svc_pid = service.stack.procs[service.spec.name].pid
            me = os.getpid()
            svc_pids = process_tree(svc_pid)
            raw_pids = [p for p in process_tree(me) if p not in svc_pids]
            names = {p: ("service" if p == svc_pid else "bench+raw" if p == me else "") for p in svc_pids + raw_pids}
            for p in svc_pids + raw_pids:
                if not names[p]:
                    names[p] = ("service " if p in svc_pids else "raw ") + Path(f"/proc/{p}/comm").read_text().strip()
            raw.run(prompts[:2]), service.run(prompts[:2])  # warm-up
            arms = {"raw": raw.run, "service": service.run}
            rates: dict[str, list[float]] = {a: [] for a in arms}
            cpu: dict[str, list[dict]] = {a: [] for a in arms}
            for r in range(args.rounds):
                for arm, fn in arms.items():
                    before = thread_cpu(svc_pids + raw_pids)
                    t0 = time.perf_counter()
                    n = fn(prompts)
                    dt = time.perf_counter() - t0
                    cpu[arm].append({"wall": dt} | diff(thread_cpu(svc_pids + raw_pids), before))
                    rates[arm].append(n / dt)
                    print(f"round {r} {arm}: {n / dt:.1f} tok/s ({dt:.2f} s) load {os.getloadavg()[0]:.2f}", flush=True)
            if args.py_spy:
                out = work / "spy.txt"
                spy = subprocess.Popen(
                    [args.py_spy, "record", "-p", str(svc_pid), "-f", "raw", "-o", str(out), "-r", "200"]
                    + ["--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(2)
                service.run(prompts)
                spy.send_signal(2)
                spy.wait(30)
                print_spy(out)
        med = {a: statistics.median(v) for a, v in rates.items()}
        print(
            f"\n{N_PROMPTS} prompts × {NEW_TOKENS} tokens, {args.rounds} rounds: raw {med['raw']:.1f} tok/s, "
            f"service {med['service']:.1f} tok/s, service/raw {med['service'] / med['raw']:.3f}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
        )
        print("| process | thread | raw arm CPU s | service arm CPU s |")
        print("|---|---|---:|---:|")
        keys = sorted({k for a in cpu for d in cpu[a] for k in d if k != "wall"}, key=str)
        rows = []
        for k in keys:
            r_ = statistics.median(d.get(k, 0.0) for d in cpu["raw"])
            s_ = statistics.median(d.get(k, 0.0) for d in cpu["service"])
            if r_ + s_ >= 0.02:
                rows.append((names.get(k[0], str(k[0])), k[1], r_, s_))
        for proc, thread, r_, s_ in sorted(rows, key=lambda x: -(x[2] + x[3])):
            print(f"| {proc} | {thread} | {r_:.2f} | {s_:.2f} |")
        walls = {a: statistics.median(d["wall"] for d in cpu[a]) for a in cpu}
        print(f"| wall | | {walls['raw']:.2f} | {walls['service']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_spy(path: Path, top: int = 25) -> None:
    """Self and inclusive sample counts of the most sampled frames of py-spy's raw output."""
    if not path.exists():
        print("py-spy wrote nothing")
        return
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"\npy-spy: {total} samples of the service's non-idle threads")
    print("| frame | self % | incl % |\n|---|---:|---:|")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {f[:110]} | {100 * own[f] / total:.1f} | {100 * n / total:.1f} |")


if __name__ == "__main__":
    main()
