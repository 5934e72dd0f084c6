"""Append-only JSON lines that survive a crash: each append is fsynced before it returns,
and a reader skips the torn last line a kill mid-append leaves. Used by the learner's
ledger and by run folders (`rlhf eval`, the experiments)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def append(path: str | os.PathLike, record: dict[str, Any], default: Callable[[Any], Any] | None = None) -> None:
    """One line for `record`, on disk before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every whole line of `path` ([] if it does not exist); a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
