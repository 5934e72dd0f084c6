"""Run folders: JSON lines over time, PNG plots, a summary table.

    <run>/config.json     what was run (arguments, models, oracle)
    <run>/<name>.jsonl    one JSON object per line, appended (fsynced) as the run goes
    <run>/*.png           plots, re-drawn from the JSON lines at any time
A run folder can be appended to by later invocations (eval rounds over hours) and read by
anything that reads JSON lines.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlhf.durability import append_jsonl, read_jsonl, write_atomic


class RunFolder:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, data: Any) -> Path:
        return write_atomic(self.root / name, json.dumps(data, indent=1, default=str) + "\n")

    def append(self, name: str, record: dict[str, Any]) -> None:
        """One line of `<name>.jsonl`, flushed to disk before returning."""
        append_jsonl(self.root / f"{name}.jsonl", record, default=_jsonable)

    def read(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.root / f"{name}.jsonl")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, markdown: bool = False) -> str:
    """A fixed-width (or markdown) table of dicts; missing cells are blank."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def line_plot(
    path: str | os.PathLike,
    title: str,
    x: Sequence[float],
    series: Iterable[tuple[str, Sequence[float]]],
    xlabel: str = "step",
    panels: Iterable[tuple[str, Iterable[tuple[str, Sequence[float]]]]] = (),
    markers: Iterable[tuple[float, str]] = (),
    hlines: Iterable[tuple[float, str]] = (),
) -> Path:
    """One PNG: the main axes with `series`, then one extra axes per panel (name, series);
    `markers` draw vertical dotted lines labelled at the top (e.g. gate refusals), `hlines`
    dashed horizontal reference lines on the main axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(panels)
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7.5, 3.4 * (1 + len(panels))), sharex=True, squeeze=False)
    groups = [(title, series)] + panels
    for ax, (name, group) in zip(axes[:, 0], groups):
        for label, ys in group:
            few = len(ys) <= 30  # a few points (eval rounds) need markers to be seen at all
            ax.plot(x[: len(ys)], ys, label=label, linewidth=1.6, marker="o" if few else None, markersize=4)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        for mx, _mlabel in markers:
            ax.axvline(mx, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0, color="black", linewidth=0.5, alpha=0.4)
    for y, label in hlines:
        axes[0, 0].axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
    if hlines:
        axes[0, 0].legend(fontsize=8, loc="best")
    marks = list(markers)
    if marks:
        ax0 = axes[0, 0]
        for mx, mlabel in marks[:1]:
            ax0.annotate(
                mlabel,
                (mx, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="grey",
                ha="left",
                va="top",
                rotation=90,
            )
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
