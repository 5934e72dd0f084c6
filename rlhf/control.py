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


# --- versions and the canary (issue 15): `rlhf versions | promote N | rollback N | canary` ---


def describe_canary(c) -> str:
    """A CanaryStatus as one line: what is served, the share, the running evidence in brief."""
    import json

    if not c.enabled and not c.candidate_version:
        return f"canaries off, stable v{c.stable_version}"
    line = f"canaries {'on' if c.enabled else 'off'}, stable v{c.stable_version}, "
    if not c.candidate_version:
        line += f"no candidate (share {c.share:g} when one runs)"
    else:
        line += f"candidate v{c.candidate_version} at share {c.share:g}"
        if c.queued:
            line += f", queued {','.join(f'v{q}' for q in c.queued)}"
        if c.evidence_json:
            ev = json.loads(c.evidence_json)
            line += (
                f"; thumbs up {ev['thumbs_up_candidate']}/{ev['thumbs_up_candidate'] + ev['thumbs_down_candidate']} "
                f"vs {ev['thumbs_up_stable']}/{ev['thumbs_up_stable'] + ev['thumbs_down_stable']}, "
                f"wins {ev['wins_candidate']}-{ev['wins_stable']}, {ev['reason']}"
            )
    if c.last_decision_json:
        last = json.loads(c.last_decision_json)
        line += f"; last decision: v{last['candidate']} {last['verdict']} ({last['reason']}, by {last['by']})"
    return line


def run_versions_command(
    action: str,
    state_dir: Path,
    address: str | None,
    token: str | None,
    timeout: float,
    version: int | None = None,
    share: float | None = None,
    enabled: bool | None = None,
) -> int:
    """`rlhf versions` (open), `rlhf promote N`, `rlhf rollback N`, `rlhf canary [--share S]
    [--on|--off]` (the last without a flag only reads). 0 and one line (`versions`: one line
    per version), or 1 and why not on stderr."""
    from rlhf.v1 import learner_pb2, learner_pb2_grpc

    address = learner_address(state_dir, address)
    writes = action in ("promote", "rollback") or share is not None or enabled is not None
    token = (token or "").strip() or control_token_from(state_dir)
    if writes and not token:
        return _fail(
            action,
            f"no control token: set RLHF_CONTROL_TOKEN or pass --token (no {Path(state_dir) / TOKEN_FILE}; "
            "`rlhf up` writes it there — pass its --state-dir)",
        )
    with sync_channel(address, control_token=token) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        try:
            if action == "versions":
                listed = stub.ListVersions(learner_pb2.ListVersionsRequest(), timeout=timeout).versions
                status = stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=timeout)
                try:
                    canary = stub.GetCanary(learner_pb2.GetCanaryRequest(), timeout=timeout)
                except grpc.RpcError as e:  # a learner without a canary plane
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    canary = None
                for v in listed:
                    print(_version_line(v, status, canary), flush=True)
                return 0
            if action == "promote":
                out = describe_canary(stub.Promote(learner_pb2.PromoteRequest(version=version), timeout=timeout))
            elif action == "rollback":
                info = stub.Rollback(learner_pb2.RollbackRequest(version=version), timeout=timeout)
                out = f"rolled back to v{info.version} (step {info.step}, KL to reference {info.kl_to_reference:.3g})"
            elif writes:
                req = learner_pb2.SetCanaryRequest(
                    set_share=share is not None,
                    share=share or 0.0,
                    set_enabled=enabled is not None,
                    enabled=bool(enabled),
                )
                out = describe_canary(stub.SetCanary(req, timeout=timeout))
            else:
                out = describe_canary(stub.GetCanary(learner_pb2.GetCanaryRequest(), timeout=timeout))
        except grpc.RpcError as e:
            return _fail(action, _why(e, address, timeout))
    print(f"learner {address}: {out}", flush=True)
    return 0


def _version_line(v, status, canary) -> str:
    roles = []
    stable = canary.stable_version if canary is not None and canary.enabled else status.serving_version
    if v.version == stable:
        roles.append("stable")
    if canary is not None and v.version == canary.candidate_version:
        roles.append(f"candidate at share {canary.share:g}")
    if canary is not None and v.version in canary.queued:
        roles.append("queued")
    gate = "passed the drift gate" if v.promoted else "refused by the drift gate"
    tail = f" [{', '.join(roles)}]" if roles else ""
    return f"v{v.version} step {v.step}: {gate} (KL {v.kl_to_reference:.3g}){tail} {v.reason}".rstrip()
