"""What `rlhf up` checks before it starts anything, so that a start that cannot work fails
in one line within a second instead of half-starting or reaching someone else's stack:
every port free (`check_ports`), the model folder complete (`check_model_dir`), the state
dir ours alone (`StateDirLock`). Each raises `PreflightError`, whose message names the
port, path or holder pid. Also the control token `rlhf up` hands its children.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlhf.durability import PidLock
from rlhf.launcher import ServiceSpec


class PreflightError(RuntimeError):
    """`rlhf up` must not start: the message is one line naming the port, path or pid."""


@dataclass(frozen=True)
class PlannedPort:
    what: str  # e.g. "generator gRPC"
    port: int
    flag: str  # the `rlhf up` flag that moves it


def planned_ports(specs: Iterable[ServiceSpec], broker_port: int | None) -> list[PlannedPort]:
    """Every port the stack will bind: the broker's (when embedded), each gRPC and metrics
    port, the gateway's HTTP port."""
    out = [PlannedPort("broker", broker_port, "--broker-port")] if broker_port else []
    for s in specs:
        if s.http:
            out.append(PlannedPort(f"{s.name} HTTP", s.port, "--http-port"))
        else:
            out.append(PlannedPort(f"{s.name} gRPC", s.port, "--base-port"))
            if s.metrics_port:
                out.append(PlannedPort(f"{s.name} metrics", s.metrics_port, "--metrics-base-port"))
    return out


def check_ports(ports: Iterable[PlannedPort], host: str = "127.0.0.1") -> None:
    """PreflightError naming the first port that is out of range, planned twice, or taken."""
    seen: dict[int, str] = {}
    for p in ports:
        if not 0 < p.port < 65536:
            raise PreflightError(f"{p.what} port {p.port} is outside 1-65535; change {p.flag}")
        if p.port in seen:
            raise PreflightError(
                f"port {p.port} would be both the {seen[p.port]} and the {p.what} port; change {p.flag}"
            )
        seen[p.port] = p.what
        with socket.socket() as s:
            # SO_REUSEADDR as the servers set it: a port only in TIME_WAIT is free for them too
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p.port))
            except OSError as e:
                raise PreflightError(
                    f"port {p.port} ({p.what}) on {host} is in use ({e.strerror}): another stack or program "
                    f"holds it; stop it or change {p.flag}"
                ) from None


# What loading a local folder needs (rlhf/models/loading.py: from_pretrained with
# local_files_only): a config, weights, and a tokenizer.
_WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: str | Path) -> Path:
    """The resolved model folder, or PreflightError naming the path and what it lacks."""
    folder = Path(path).expanduser()
    hint = 'pass a folder written by save_pretrained, "demo", or --tiny'
    if not folder.exists():
        raise PreflightError(f"--model {path}: no such folder; {hint}")
    if not folder.is_dir():
        raise PreflightError(f"--model {path} is a file, not a model folder; {hint}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(any(folder.glob(g)) for g in _WEIGHT_GLOBS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise PreflightError(f"--model {path} is not a model folder: no {', no '.join(missing)}; {hint}")
    return folder.resolve()


class StateDirLock(PidLock):
    """An exclusive flock on `<state_dir>/up.lock`, which holds our pid: one `rlhf up` per
    state dir (two would share checkpoints, the outbox and up.json).

        with StateDirLock(state_dir):
            ...
    """

    def __init__(self, state_dir: Path):
        path = state_dir / "up.lock"
        super().__init__(
            path,
            lambda holder: PreflightError(
                f"state dir {state_dir} is in use by another rlhf up (pid {holder}, lock {path}); "
                "stop it, or pass another --state-dir"
            ),
        )


def control_token(state_dir: Path) -> str:
    """The control-plane token every child gets (rlhf/serving/auth.py): RLHF_CONTROL_TOKEN
    when set, else `<state_dir>/control.token`, created (random, mode 0600) on the first run
    and reused after, so clients on this machine can read it from there."""
    from rlhf.serving.auth import TOKEN_FILE, control_token_from

    token = control_token_from(state_dir)
    if token:
        return token
    path = state_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an empty file: replace it
    # O_EXCL with mode 0600: the token is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
