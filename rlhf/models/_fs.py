"""Model folders (prepared, exported, tiny, SFT checkpoints): written atomically (a reader
sees no folder or a complete one, never half of one), marked complete, readable by all."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from rlhf import durability

COMPLETE_MARKER = ".rlhf-complete"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock beside ``folder`` so two processes do not build it at once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_folder(final: Path, marker: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to fill; on success write the completion marker
    last and rename it into place (replacing any old ``final``, see
    `rlhf.durability.atomic_folder`). On error nothing is left."""
    with durability.atomic_folder(final) as tmp:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(marker)
        _make_readable(tmp)


def _make_readable(folder: Path) -> None:
    # mkdtemp (and some writers, e.g. safetensors) create owner-only modes; models are
    # shared read-only with other users and containers, so open them up to reading.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
