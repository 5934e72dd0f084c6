"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def detach_and_die_with_parent() -> None:
    """preexec_fn: a session of its own (a terminal's Ctrl-C reaches only the parent, which
    stops children in order), and SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: atexit and stop() still clean up
        pass
