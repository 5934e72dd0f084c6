"""Prompt files, read in one place: the rollout worker's prompt set, the drift gate's held-out
prompts (`drift_prompts_file`) and the experiments' train / held-out prompts.

    rlhf/data/prompts_train.jsonl   the bundled training set: what the rollout worker samples
    rlhf/data/prompts_eval.jsonl    the bundled held-out set: subjects never in the training set
(both built by `python -m rlhf.rollout.prompt_set`).

Two formats, told apart by the file's suffix:
- `.jsonl`: one JSON object per line, either a prompt record
  `{"id": ..., "category": ..., "messages": [{"role": ..., "content": ...}, ...]}` (kept as
  it is, system turns included) or `{"prompt": "..."}` (one user turn);
- anything else: plain text, one user prompt per line; blank lines and lines starting with
  `#` are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN = DATA_DIR / "prompts_train.jsonl"
EVAL = DATA_DIR / "prompts_eval.jsonl"
SPLITS = {"train": TRAIN, "heldout": EVAL}


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt records of `path` (see the module docstring); a record has at least "id"
    and "messages". ValueError for a file without prompts or a line that is not one."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        records = [_record(json.loads(ln), path, i) for i, ln in enumerate(lines)]
    else:
        texts = [ln.strip() for ln in lines if not ln.startswith("#")]
        records = [
            {"id": f"{path.stem}-{i}", "category": "", "messages": [{"role": "user", "content": t}]}
            for i, t in enumerate(texts)
        ]
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records


def load_prompt_texts(split: str = "train", path: str | Path | None = None) -> list[str]:
    """The last user turn of each prompt of `path`, or of the bundled `split` ("train" or
    "heldout") when no path is given; records without a user turn are left out."""
    if not path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        path = SPLITS[split]
    texts = []
    for record in load_prompts(path):
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        if users:
            texts.append(str(users[-1]))
    if not texts:
        raise ValueError(f"{path}: no user prompts found")
    return texts


def _record(row: Any, path: Path, i: int) -> dict[str, Any]:
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row
    if isinstance(row, dict) and "prompt" in row:
        return {
            "id": str(row.get("id", f"{path.stem}-{i}")),
            "category": str(row.get("category", "")),
            "messages": [{"role": "user", "content": str(row["prompt"])}],
        }
    raise ValueError(f'{path}: prompt {i + 1}: needs a "messages" list or a "prompt" string')
