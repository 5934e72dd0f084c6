"""Crash-safe learner state: checkpoints written atomically, and the trained-rollout ledger.

    <dir>/checkpoints/ckpt-00000012/   numbered in save order
        policy.safetensors       LoRA adapter or full weights (PolicyWithValueHead.policy_state_dict)
        value_head.safetensors
        trainer.pt               optimizer, LR schedule, KL controller, shuffle RNG
        meta.json                step, versions, lineage, consumed Kafka offsets, counters
    <dir>/ledger.jsonl           one line per PPO step: the event ids it trained / dropped
    <dir>/writer.lock            held (flock) by the one learner that writes here (durability.writer_lock)

A checkpoint folder is filled under a temporary name, fsynced and renamed into place, so
a `ckpt-*` folder is always complete: SIGKILL during a write leaves only a `.tmp-*`
folder, which the next start deletes. The ledger is appended (and fsynced) *before* the
checkpoint that covers its line, and cut back to the checkpoint's step on recovery, so
after any crash it lists exactly the rollouts in the restored model's history.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.durability import append_jsonl, atomic_folder, read_jsonl, write_jsonl_atomic
from rlhf.learner.policy import PolicyWithValueHead
from rlhf.learner.trainer import PPOTrainer


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):  # writes a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)

    def folders(self) -> list[Path]:
        return sorted(self.root.glob("ckpt-[0-9]*"))

    def latest(self) -> Path | None:
        folders = self.folders()
        return folders[-1] if folders else None

    def save(self, step: int, policy: PolicyWithValueHead, trainer: PPOTrainer, meta: dict[str, Any]) -> Path:
        folders = self.folders()
        seq = int(folders[-1].name.split("-")[1]) + 1 if folders else 1
        final = self.root / f"ckpt-{seq:08d}"
        with atomic_folder(final, prefix=f".tmp-ckpt-{seq:08d}-") as tmp:
            save_file(_cpu(policy.policy_state_dict()), str(tmp / "policy.safetensors"))
            save_file(_cpu(policy.value_head.state_dict()), str(tmp / "value_head.safetensors"))
            torch.save(trainer.state_dict(), tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps(meta | {"step": step}, indent=1))
        for old in self.folders()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(folder: Path, policy: PolicyWithValueHead, trainer: PPOTrainer) -> dict[str, Any]:
        device = policy.device
        policy.load_policy_state_dict(load_file(str(folder / "policy.safetensors"), device=str(device)))
        policy.value_head.load_state_dict(load_file(str(folder / "value_head.safetensors"), device=str(device)))
        trainer.load_state_dict(torch.load(folder / "trainer.pt", map_location=device, weights_only=False))
        return json.loads((folder / "meta.json").read_text())


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


class Ledger:
    """Append-only JSON lines, one per PPO step: {"step", "trained": [...], "dropped_stale": [...], ...}."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, entry: dict[str, Any]) -> None:
        append_jsonl(self.path, entry)

    def entries(self) -> list[dict[str, Any]]:
        # a line cut short by a crash is skipped: no checkpoint ever covers it
        return read_jsonl(self.path)

    def truncate_after(self, step: int) -> int:
        """Keep the entries of steps ≤ step (the restored checkpoint's); returns how many went."""
        entries = self.entries()
        keep = [e for e in entries if e["step"] <= step]
        write_jsonl_atomic(self.path, keep)
        return len(entries) - len(keep)
