"""Child processes that never outlive the process that started them, and what `rlhf up`
reads from them: whether they hold a port, and the log line that says why one died."""

from __future__ import annotations

import ctypes
import json
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def detach_and_die_with_parent() -> None:
    """preexec_fn: a session of its own (a terminal's Ctrl-C reaches only the parent, which
    stops children in order), and SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: atexit and stop() still clean up
        pass


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux /proc), so a
    health answer on that port is our child's and not another program's; None where /proc
    cannot tell (not Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address(HEXIP:HEXPORT) rem_address st(0A = LISTEN) ... uid timeout inode
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None if not Path("/proc/self/fd").exists() else False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


_SKIP = ("For further information visit", "--- rlhf up: ")


def last_log_line(text: str, limit: int = 300) -> str:
    """The line of a child's log that says why it died, unescaped, on one line: the last
    ERROR record of a JSON log (its msg, and its exception's last line), or the exception
    line of the last Python traceback, else the last line."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(_SKIP)]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        record = _json_record(line)
        if record is not None:
            if record.get("level") in ("ERROR", "CRITICAL"):
                msg, exc = str(record.get("msg", "")), record.get("exc")
                return _one_line(f"{msg}: {_exception(str(exc).splitlines())}" if exc else msg, limit)
            continue
        if line.startswith("Traceback (most recent call last)"):
            return _one_line(_exception(lines[i:]), limit)
    return _one_line(lines[-1], limit) if lines else "(empty log)"


def _json_record(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _exception(tb: list[str]) -> str:
    """`Type: message` (and the lines the message continues on) from a traceback's lines."""
    starts = [i for i, ln in enumerate(tb) if ln.startswith("Traceback (most recent call last)")]
    body = [ln for ln in tb[starts[-1] + 1 if starts else 0 :] if ln.strip() and not ln.lstrip().startswith(_SKIP)]
    for j, ln in enumerate(body):
        if not ln[0].isspace():  # frames are indented; the exception line is not
            kind, sep, msg = ln.partition(":")
            return " ".join([kind.rsplit(".", 1)[-1] + sep + msg, *(r.strip() for r in body[j + 1 :])])
    return tb[-1] if tb else ""


def _one_line(s: str, limit: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"
