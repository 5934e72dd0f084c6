"""`rlhf pause` / `rlhf resume`: the learner's control plane from a terminal.

Where the learner is: `--learner HOST:PORT`, else the address the running `rlhf up` wrote to
`<state_dir>/up.json`, else `RLHF_LEARNER_ADDR`, else the default learner port. The control
token (rlhf/serving/auth.py): `--token`, else `RLHF_CONTROL_TOKEN`, else
`<state_dir>/control.token`, the file `rlhf up` writes and hands its services. The answer
is one line, the learner's new status; any failure is one line on stderr naming what to
fix, and exit code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from rlhf.launcher import default_specs, read_endpoints
from rlhf.serving.auth import TOKEN_FILE, control_token_from
from rlhf.serving.client import sync_channel


def learner_address(state_dir: Path, given: str | None = None) -> str:
    if given:
        return given
    specs = read_endpoints(state_dir) or []
    found = next((s.address for s in specs if s.name == "learner"), None)
    return (
        found or os.environ.get("RLHF_LEARNER_ADDR") or next(s.address for s in default_specs() if s.name == "learner")
    )


def describe(status) -> str:
    """A LearnerStatus as the one line `rlhf pause` / `rlhf resume` print."""
    state = "paused" if status.paused else "training"
    return (
        f"{state} at step {status.step}, policy v{status.policy_version}, serving v{status.serving_version}, "
        f"{status.rollouts_trained} rollouts trained"
    )


def run(action: str, state_dir: Path, address: str | None, token: str | None, timeout: float) -> int:
    """`action` ("pause" or "resume") on the learner; 0 and its new status, or 1 and why not."""
    from rlhf.v1 import learner_pb2, learner_pb2_grpc

    address = learner_address(state_dir, address)
    token = (token or "").strip() or control_token_from(state_dir)
    if not token:
        return _fail(
            action,
            f"no control token: set RLHF_CONTROL_TOKEN or pass --token (no {Path(state_dir) / TOKEN_FILE}; "
            "`rlhf up` writes it there — pass its --state-dir)",
        )
    call, request = {
        "pause": ("Pause", learner_pb2.PauseRequest()),
        "resume": ("Resume", learner_pb2.ResumeRequest()),
    }[action]
    with sync_channel(address, control_token=token) as channel:
        try:
            status = getattr(learner_pb2_grpc.LearnerServiceStub(channel), call)(request, timeout=timeout)
        except grpc.RpcError as e:
            return _fail(action, _why(e, address, timeout))
    print(f"learner {address}: {describe(status)}", flush=True)
    return 0


def _why(e: grpc.RpcError, address: str, timeout: float) -> str:
    code, details = e.code(), (e.details() or "").split("\n")[0]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"refused by the learner at {address}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"learner at {address} unavailable ({details}): is `rlhf up` running? "
            "pass its --state-dir, or --learner HOST:PORT"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"the learner at {address} did not answer within {timeout:g} s (a pause waits for the PPO step "
            "in flight): pass a longer --timeout"
        )
    return f"the learner at {address} answered {code.name}: {details}"


def _fail(action: str, message: str) -> int:
    print(f"rlhf {action}: {message}", file=sys.stderr, flush=True)
    return 1
