"""Prompt sets for simulated users and evaluation: the bundled set's splits when it exists
(rlhf/data, issue 4), otherwise a small built-in set; or any file (.txt one prompt a line,
.jsonl with a "prompt" or "messages" field)."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

# built-in training prompts: varied, short, answerable in a sentence
TRAIN_PROMPTS: tuple[str, ...] = (
    "How do I make tea?",
    "What is a river?",
    "Tell me about mountains.",
    "Explain gravity.",
    "Write a short poem about rain.",
    "What should I read next?",
    "How do bridges work?",
    "Describe a busy city.",
    "What is the boiling point of water?",
    "Give me a tip for learning to code.",
    "Why do cats purr?",
    "What is a good breakfast?",
    "How far away is the moon?",
    "Name a famous painter.",
    "What is machine learning?",
    "How do I stay focused?",
    "What causes rain?",
    "Suggest a name for a dog.",
    "What is the largest ocean?",
    "How do plants grow?",
    "What is a prime number?",
    "Recommend a board game.",
    "How does a bicycle work?",
    "What is your favourite colour?",
)


def heldout_builtin() -> list[str]:
    """The drift gate's default held-out prompts: eval and the gate measure the same set."""
    from rlhf.learner.drift import DEFAULT_HELDOUT_PROMPTS

    return list(DEFAULT_HELDOUT_PROMPTS)


def _read(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" in row:
                out.append(str(row["prompt"]))
            elif "messages" in row:
                users = [m["content"] for m in row["messages"] if m.get("role") == "user"]
                if users:
                    out.append(str(users[-1]))
        return out
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def load_prompts(split: str = "train", path: str | Path | None = None) -> list[str]:
    """Prompts of `split` ("train" or "heldout"): from `path` if given, else the bundled
    data set's file for that split if the package has one, else the built-in set."""
    if path:
        prompts = _read(Path(path))
        if not prompts:
            raise ValueError(f"{path}: no prompts found")
        return prompts
    names = {"train": ("prompts_train", "train", "prompts"), "heldout": ("prompts_eval", "prompts_heldout", "heldout", "eval")}
    for stem in names.get(split, (split,)):
        for ext in (".jsonl", ".txt"):
            candidate = DATA_DIR / f"{stem}{ext}"
            if candidate.is_file():
                prompts = _read(candidate)
                if prompts:
                    return prompts
    if split not in names:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return list(TRAIN_PROMPTS) if split == "train" else heldout_builtin()
