"""`rlhf raters` / `rlhf raters --release RATER`: rater reliability from a terminal.

Where the reward service is: `--reward HOST:PORT`, else the address the running `rlhf up`
wrote to `<state_dir>/up.json`, else `RLHF_REWARD_ADDR`, else the default reward port.
Listing is open; a release is a control RPC and carries the control token as `rlhf promote`
does (`--token`, else `RLHF_CONTROL_TOKEN`, else `<state_dir>/control.token`). Failures
are one line on stderr naming what to fix, and exit code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from rlhf.serving.auth import TOKEN_FILE, control_token_from
from rlhf.serving.client import sync_channel


def reward_address(state_dir: Path, given: str | None = None) -> str:
    from rlhf.launcher import default_specs, read_endpoints

    if given:
        return given
    found = next((s.address for s in read_endpoints(state_dir) or [] if s.name == "reward"), None)
    return found or os.environ.get("RLHF_REWARD_ADDR") or next(s.address for s in default_specs() if s.name == "reward")


def describe_rater(r) -> str:
    """One RaterInfo as one line of `rlhf raters`."""
    state = "QUARANTINED" if r.quarantined else "released" if r.released else "ok"
    held = f", {r.held_examples} examples held" if r.held_examples else ""
    return f"{r.rater_id}: {state}, accuracy {r.accuracy:.3f} over {r.votes} votes, weight {r.weight:.2f}{held}"


def run_raters(state_dir: Path, address: str | None, token: str | None, timeout: float, release: str | None) -> int:
    """List the raters (0, one line each and a total), or release one (0 and what came back)."""
    from rlhf.v1 import reward_pb2, reward_pb2_grpc

    address = reward_address(state_dir, address)
    token = (token or "").strip() or control_token_from(state_dir)
    if release and not token:
        return _fail(
            f"no control token: set RLHF_CONTROL_TOKEN or pass --token (no {Path(state_dir) / TOKEN_FILE}; "
            "`rlhf up` writes it there — pass its --state-dir)"
        )
    with sync_channel(address, control_token=token) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        try:
            if release:
                out = stub.ReleaseRater(reward_pb2.ReleaseRaterRequest(rater_id=release), timeout=timeout)
                print(
                    f"reward {address}: released {out.rater_id} (was {'' if out.was_quarantined else 'not '}"
                    f"quarantined): {out.released_examples} held examples and {out.replayed_events} events "
                    f"({out.replayed_examples} examples) from the quarantine topic train again",
                    flush=True,
                )
                return 0
            listed = stub.ListRaters(reward_pb2.ListRatersRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code, details = e.code(), (e.details() or "").split("\n")[0]
            if code == grpc.StatusCode.UNAVAILABLE:
                return _fail(f"reward service at {address} unavailable ({details}): pass --state-dir or --reward")
            return _fail(f"the reward service at {address} answered {code.name}: {details}")
    for r in listed.raters:
        print(describe_rater(r), flush=True)
    print(f"{len(listed.raters)} raters, {listed.quarantined} quarantined", flush=True)
    return 0


def _fail(message: str) -> int:
    print(f"rlhf raters: {message}", file=sys.stderr, flush=True)
    return 1
