"""The canary decision rule's error rates and power, by simulation (docs/canary.md's table).

    .venv/bin/python benchmarks/canary_decision.py              # ≈ 1–2 min on 2 cores
    .venv/bin/python benchmarks/canary_decision.py --sims 500   # quicker, coarser

Each row runs `--sims` canaries through the real rule (rlhf/testing/canary.py: the decision
code of rlhf/canary/decision.py with a batch axis), `--events` feedback events each, the
verdict checked after every event, with the default CanaryConfig (α_promote 0.05,
α_rollback 0.10, 50 events per arm) and no duration limit. Equal versions give the
false-promotion and false-rollback rates (bounds 0.05 and 0.10), the same thumbs streams
also the rate of a fixed-sample z-test peeked at after every event; unequal versions give
the share decided correctly within the horizon and the events by which half and 80 % were.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.canary.config import CanaryConfig  # noqa: E402
from rlhf.testing.canary import PROMOTE, ROLL_BACK, simulate_canaries  # noqa: E402

# (label, kind, p_candidate, p_stable, share, right verdict or None for equal versions)
ROWS = [
    ("thumbs 0.5 = 0.5, share 0.5", "thumbs", 0.5, 0.5, 0.5, None),
    ("thumbs 0.3 = 0.3, share 0.1", "thumbs", 0.3, 0.3, 0.1, None),
    ("comparisons, win rate 0.5", "comparisons", 0.5, 0.5, 0.5, None),
    ("thumbs 0.5 → 0.6, share 0.5", "thumbs", 0.6, 0.5, 0.5, PROMOTE),
    ("thumbs 0.5 → 0.6, share 0.1", "thumbs", 0.6, 0.5, 0.1, PROMOTE),
    ("thumbs 0.5 → 0.7, share 0.1", "thumbs", 0.7, 0.5, 0.1, PROMOTE),
    ("thumbs 0.5 → 0.4, share 0.5", "thumbs", 0.4, 0.5, 0.5, ROLL_BACK),
    ("comparisons, win rate 0.6", "comparisons", 0.6, 0.5, 0.5, PROMOTE),
    ("comparisons, win rate 0.55", "comparisons", 0.55, 0.5, 0.5, PROMOTE),
]


def _events(n: float, horizon: int) -> str:
    return f"{n:.0f}" if n != float("inf") else f"> {horizon}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=2000, help="canaries per row")
    ap.add_argument("--events", type=int, default=4000, help="feedback events per canary (the horizon)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = CanaryConfig(max_events=0, max_duration_seconds=0.0)
    print(f"{args.sims} canaries per row, {args.events} events each, verdict checked after every event\n")
    print(
        f"| {'scenario':<30} | promoted | rolled back | naive z-test promoted | events to right verdict, 50 % / 80 % |"
    )
    print(f"|{'-' * 32}|---------:|------------:|----------------------:|-------------------------------------:|")
    t0 = time.perf_counter()
    for i, (label, kind, p_c, p_s, share, right) in enumerate(ROWS):
        out = simulate_canaries(
            args.sims, args.events, kind=kind, p_candidate=p_c, p_stable=p_s, share=share, config=config,
            seed=args.seed + i, naive=kind == "thumbs" and right is None,
        )  # fmt: skip
        naive = f"{out.naive_promoted.mean():.3f}" if kind == "thumbs" and right is None else "–"
        by = "–" if right is None else " / ".join(_events(out.events_for(right, q), args.events) for q in (0.5, 0.8))
        print(f"| {label:<30} | {out.rate(PROMOTE):>8.3f} | {out.rate(ROLL_BACK):>11.3f} | {naive:>21} | {by:>37} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
