"""Crash-safe writes, written once: what the weight store, both checkpoint stores, the
learner's ledger, model folders and run folders use to survive SIGKILL or a power cut.

The three rules every writer here follows:
- a file is complete before anyone can see it under its name: it is written under a
  temporary name beside it, fsynced, renamed over the old one (`os.replace`, atomic on
  POSIX), and the folder is fsynced so that the rename itself is on disk;
- a folder is complete before anyone can see it under its name: it is filled under a
  temporary sibling name, every file and sub-folder in it is fsynced, and it is renamed into
  place (an older folder of that name is moved aside first: rename(2) cannot replace a
  non-empty folder);
- JSON lines are appended and fsynced one at a time; a reader skips the torn last line a
  kill mid-append leaves, so whatever it returns was written whole.

The gateway's outbox is the one durable store not written through here: SQLite's own
write-ahead log and `synchronous` setting make its commits durable (rlhf/outbox.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Callable


def fsync_file(path: str | os.PathLike) -> None:
    """Flush `path`'s data to disk (a file written by a library that does not fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk: after a rename into it, the new name survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`, `folder` last."""
    for parent, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(os.path.join(parent, name))
        for name in dirs:
            fsync_dir(os.path.join(parent, name))
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a file open on `.<name>.tmp` beside `final` (mode "w" or "wb"); on success it is
    fsynced and renamed over `final`, and the folder fsynced. On error nothing is left and an
    old `final` is untouched."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(final: str | os.PathLike, data: str | bytes) -> Path:
    """`final` holds `data` (text or bytes), all of it or, after a crash, its old contents."""
    with atomic_file(final, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(final)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, prefix: str = "") -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final` (named `prefix` + random, default
    `.<name>.tmp-`) to fill; on success it is fsynced whole and renamed to `final`, replacing
    an older folder of that name. On error the temporary folder is removed.

    A crash leaves either the old `final`, the new one, or (between moving the old one aside
    and renaming the new one in) none: never half of one. Leftover temporary folders are the
    caller's to clear; their prefix says which they are."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / "x")
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, record: dict[str, Any], default: Callable[[Any], Any] | None = None) -> None:
    """One JSON line for `record` at the end of `path`, on disk before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
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


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Replace `path` with exactly `records`, one line each (atomically: see `atomic_file`)."""
    with atomic_file(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


class PidLock:
    """An exclusive flock on `path`, the file holding the holder's pid: one holder at a time
    (one `rlhf up` per state dir, one learner per checkpoint dir). A second holder fails at
    once with `busy(holder_pid)`, which names the holder. The kernel drops the lock when the
    holder dies (SIGKILL included), so a stale file never blocks a new holder; the file
    stays after release (unlinking it would race the next holder)."""

    def __init__(self, path: str | os.PathLike, busy: Callable[[str], Exception]):
        self.path = Path(path)
        self._busy = busy
        self._fd: int | None = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self._busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StateLocked(RuntimeError):
    """Another process holds state that one writer owns."""


def writer_lock(path: str | os.PathLike, what: str) -> PidLock:
    """The `PidLock` of a single writer (`what`: "reward trainer") over the state dir that
    holds `path`: a second one fails at `acquire()` with StateLocked naming the holder's pid,
    the lock file and what to do."""
    path = Path(path)
    return PidLock(
        path,
        lambda holder: StateLocked(
            f"{path.parent} is written by another {what} (pid {holder}, lock {path}); "
            f"one {what} per state dir: stop it, or give this one another RLHF_STATE_DIR"
        ),
    )
