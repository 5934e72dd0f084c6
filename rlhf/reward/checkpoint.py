"""Reward-model versions and trainer checkpoints on disk.

    <root>/versions/v000007/       WeightStore folder: model.safetensors + manifest.json,
                                   manifest meta = train step, online accuracy, normaliser
    <root>/trainer/state-000000420-v000007.pt   optimiser, normaliser, replay buffer, de-dup ids,
                                   thumbs pairing memory, counters, Kafka offsets, and the
                                   version holding the weights of that step

Write order (and what a crash between two writes leaves):
  1. weights → a new version (atomic; an interrupted write is ignored on read)
  2. trainer state naming that version (atomic rename)
  3. Kafka offsets committed (by the caller)
A crash after 1 leaves a version no state names: it may have been announced, so its
number is never reused (the next version is always latest + 1). A crash after 2 replays
events past the committed offsets; their ids are in the restored de-dup set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rlhf.durability import atomic_file
from rlhf.weightstore import VersionRecord, WeightStore


class RewardCheckpoints:
    def __init__(
        self,
        root: str | os.PathLike,
        keep_versions: int = 5,
        keep_states: int = 2,
        versions: str | os.PathLike | None = None,
    ):
        """`versions`: where the versions live when not <root>/versions (a volume that
        scorer replicas mount too)."""
        self.root = Path(root)
        self.store = WeightStore(Path(versions) if versions is not None else self.root / "versions")
        self.states = self.root / "trainer"
        self.keep_versions = keep_versions
        self.keep_states = keep_states

    def next_version(self) -> int:
        latest = self.store.latest()
        return (latest.version if latest else 0) + 1

    def publish(
        self, tensors: dict[str, torch.Tensor], parent: int, base_model: str, meta: dict[str, Any]
    ) -> VersionRecord:
        """Write the weights as the next version (atomic)."""
        return self.store.put(self.next_version(), tensors, parent=parent, base_model=base_model, meta=meta)

    def save_state(self, step: int, version: int, state: dict[str, Any]) -> Path:
        """Write the trainer state of `step`, whose weights are `version` (atomic)."""
        self.states.mkdir(parents=True, exist_ok=True)
        final = self.states / f"state-{step:09d}-v{version:06d}.pt"
        with atomic_file(final, "wb") as f:
            torch.save({"step": step, "version": version, **state}, f)
        self._prune()
        return final

    def latest_state(self) -> dict[str, Any] | None:
        """The newest trainer state whose weights version exists, or None (fresh start).
        States that all name versions the store does not hold mean the store moved or was
        lost (pruning keeps every version a kept state names): that is refused, naming both
        folders, rather than silently starting the RM from scratch."""
        states = sorted(self.states.glob("state-*.pt"), reverse=True)
        for path in states:
            if (self.store.folder(_version_of(path)) / "manifest.json").exists():
                return torch.load(path, map_location="cpu", weights_only=True)
        if states:
            named = sorted({_version_of(p) for p in states})
            raise FileNotFoundError(
                f"the reward trainer states in {self.states} name RM versions {named}, which the store "
                f"{self.store.root} does not hold: was RLHF_REWARD_STORE changed? Point it back, or copy the "
                "version folders there"
            )
        return None

    def adopt(self, old: str | os.PathLike) -> list[int]:
        """Copy the versions of a previous store folder `old` (the default <root>/versions,
        before RLHF_REWARD_STORE pointed elsewhere) into this store, when this one holds
        none: an upgrade keeps its trained RM. The weights first, the manifest last, so an
        interrupted copy reads as absent and is copied again on the next start."""
        old = Path(old)
        if old.resolve() == self.store.root.resolve() or self.store.versions():
            return []
        copied = []
        for record in WeightStore(old).versions():
            dest = self.store.folder(record.version)
            shutil.rmtree(dest, ignore_errors=True)  # a copy cut short last time
            dest.mkdir(parents=True)
            src = Path(record.path)
            for f in sorted(src.iterdir(), key=lambda f: f.name == "manifest.json"):
                shutil.copy2(f, dest / f.name)
            copied.append(record.version)
        return copied

    def load_weights(self, version: int) -> tuple[VersionRecord, dict[str, torch.Tensor]]:
        return self.store.load(version)

    def _prune(self) -> None:
        """Keep the newest `keep_states` states, the newest `keep_versions` versions, and
        every version a kept state names."""
        states = sorted(self.states.glob("state-*.pt"))
        for old in states[: -self.keep_states]:
            old.unlink(missing_ok=True)
        named = {_version_of(p) for p in states[-self.keep_states :]}
        for record in self.store.versions()[: -self.keep_versions]:
            if record.version not in named:
                # the manifest first: a half-deleted folder must read as absent
                (Path(record.path) / "manifest.json").unlink(missing_ok=True)
                shutil.rmtree(record.path, ignore_errors=True)


def _version_of(state_path: Path) -> int:
    return int(state_path.stem.rsplit("-v", 1)[1])
