"""Peak resident memory of a whole `rlhf up` stack, per process and in all.

    .venv/bin/python benchmarks/stack_memory.py                   # the 135M demo model, as `make up`
    .venv/bin/python benchmarks/stack_memory.py --tiny --seconds 30

Starts `rlhf up` (ports from tests/procs.up_ports, as the end-to-end tests do) on a fresh
state folder, waits for "all services SERVING", lets the loop run `--seconds` (the rollout
worker generating, the learner and the reward service training as feedback and rollouts
come), then reads every process below it from /proc: VmHWM (its peak RSS) and VmRSS (now),
named by its `-m` module. Shared pages (torch's libraries, the same model file mapped by
several services) count in every process that maps them, so the sum is an upper bound of
what the stack holds. Prints a markdown table; docs/generation.md records it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generation import proc_status_kb, process_tree  # noqa: E402
from tests.procs import stop_up, up_command, up_ports, wait_for_line  # noqa: E402


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        return f"{module} {' '.join(a for a in argv[argv.index('-m') + 2 :] if a)[:40]}".strip()
    return Path(argv[0]).name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the 135M demo model")
    ap.add_argument("--seconds", type=float, default=120, help="how long the loop runs after SERVING")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for SERVING")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="stack-memory-") as tmp:
        ports = up_ports()
        argv = up_command(Path(tmp) / "state", ports, "--timeout", str(int(args.timeout)))
        if not args.tiny:
            argv.remove("--tiny")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: list[str] = []
        try:
            t0 = time.perf_counter()
            wait_for_line(proc, "all services SERVING", args.timeout, seen)
            print(f"SERVING after {time.perf_counter() - t0:.0f} s; the loop runs {args.seconds:.0f} s", flush=True)
            time.sleep(args.seconds)
            rows = [
                (process_name(p), proc_status_kb(p, "VmHWM"), proc_status_kb(p, "VmRSS"))
                for p in process_tree(proc.pid)
            ]
        finally:
            stop_up(proc)

    print(f"\n`rlhf up{' --tiny' if args.tiny else ''}`, {args.seconds:.0f} s after SERVING\n")
    print("| process | peak RSS (MB) | RSS at the end (MB) |")
    print("|---|---:|---:|")
    for name, hwm, rss in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {hwm / 1024:.0f} | {rss / 1024:.0f} |")
    print(f"| **sum** | **{sum(r[1] for r in rows) / 1024:.0f}** | **{sum(r[2] for r in rows) / 1024:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
