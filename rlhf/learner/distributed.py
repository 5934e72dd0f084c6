"""Several learner processes as one learner: torchrun-launched ranks over torch.distributed.

    torchrun --nproc-per-node 2 -m services.learner      # 2 ranks, gloo on CPU, NCCL on GPUs

One process (no torchrun, or WORLD_SIZE=1) is the world-size-1 case of the same code:
`Ranks.single()`, no process group, every collective below a no-op.

Who does what. Rank 0 is the learner of rlhf/learner/loop.py: it alone reads Kafka,
validates, keeps the ledger, writes checkpoints, gates and publishes versions and serves
the gRPC control plane. The other ranks hold a replica of the policy and the trainer and
wait for rank 0's commands (`PPOTrainer.follow`): a step on a batch rank 0 broadcasts, the
full training state after a restore or a weight switch, a keep-alive, stop.

A PPO step on W ranks is the step on one (rlhf/learner/trainer.py): every rank has the
whole batch, draws the same minibatch shuffles and sees the same global token counts; it
runs only its share of each minibatch's rows (`shard`) and the behaviour pass's, and the
gradients are summed across ranks (`sum_gradients`, one all-reduce per optimizer step)
before clipping, so every rank takes the same optimizer step and the replicas stay equal.
The losses are already normalised by the minibatch's global token (or pair) count, so the
sum is the single-rank gradient, up to float summation order.

Why not DDP: its reducer all-reduces inside backward and needs every rank to run the same
number of backward passes over the same set of used parameters; a minibatch whose rows do
not split evenly into micro-batches, the value head unused by grpo/rloo/dpo, and the users'
feedback term's extra backward break both. The state is replicated, not sharded, so the
checkpoint is rank 0's full state dict (rlhf/learner/checkpoint.py, unchanged): nothing in
it depends on the world size, and a run resumes at any number of ranks — rank 0 restores
it and sends it to the others (`PPOTrainer.share_state`).

A lost rank: a collective with a dead peer raises (gloo: the connection closes; else the
timeout, `dist_timeout_seconds`); that error is re-raised as RankLost, a BaseException the
loop's containment of failed steps does not catch, so the batch is not dead-lettered, the
step is undone and the process exits non-zero. torchrun then stops the other ranks and the
supervisor (torchrun --max-restarts, Kubernetes, compose) restarts them all; rank 0 resumes
from its checkpoint, exactly once as with one process.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# Elements per all-reduce when summing gradients (64 MiB of fp32): a few calls for a full
# fine-tune of a 135M model, one for a LoRA adapter.
BUCKET_ELEMENTS = 1 << 24


class RankLost(SystemExit):
    """A collective failed: another rank died or stopped answering. Not a failed step: the
    process must exit (non-zero) for the supervisor to restart every rank."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Ranks:
    """This process's place among the learner's ranks, and the collectives the learner uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    keep_alive_seconds: float = 60.0
    broken: bool = field(default=False, repr=False)  # a collective failed: the group is unusable

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def from_env(cls, device: torch.device, timeout_seconds: float = 600.0) -> Ranks:
        """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT); without them, or with WORLD_SIZE=1, one rank and no group.
        `device` is the learner's (resolve_device): cuda means NCCL and one GPU per local
        rank, cpu means gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
        log.info("joined the learner's process group", extra={"rank": rank, "world_size": world, "backend": backend})
        return cls(rank, world, local, backend, keep_alive_seconds=max(1.0, timeout_seconds / 4))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: owns Kafka, the ledger, checkpoints, publishing and the control plane."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The rank's device: its own GPU (cuda:LOCAL_RANK) when the learner's is cuda."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # --- splitting the work -----------------------------------------------------------

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of `rows` (torch.tensor_split: sizes differ by ≤ 1;
        a rank may get none)."""
        if not self.distributed:
            return rows
        return rows.tensor_split(self.world_size)[self.rank]

    # --- collectives (no-ops on one rank) ---------------------------------------------

    def _collective(self, what: str, fn, *args, **kwargs):
        import torch.distributed as dist

        if self.broken:
            raise RankLost(f"learner rank {self.rank}: the process group is broken; cannot {what}")
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:  # DistBackendError, DistNetworkError, gloo's RuntimeError
            self.broken = True
            raise RankLost(
                f"learner rank {self.rank} of {self.world_size}: {what} failed, another rank died or stopped "
                f"answering ({type(e).__name__}: {str(e)[:300]}); exiting so that every rank restarts"
            ) from e

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) each tensor in place."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            self._collective("all_reduce", dist.all_reduce, t)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's .grad over the ranks, in place. A parameter no rank has a
        gradient for keeps grad None (AdamW skips it, as on one rank); one that only some
        ranks have (a rank ran no rows) gets the others' sum."""
        if not self.distributed or not params:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        self.sum_(has)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        for bucket in _buckets(live, BUCKET_ELEMENTS):
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in bucket]
            )
            self.sum_(flat)
            for p, piece in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = piece.view_as(p).to(p.dtype)

    def sum_floats(self, values: dict[str, Any]) -> dict[str, float]:
        """Sum numbers (floats or 0-d tensors) by key over the ranks; a key a rank lacks counts 0."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        mine = {k: float(v) for k, v in values.items()}
        everyone: list[Any] = [None] * self.world_size
        self._collective("all_gather_object", dist.all_gather_object, everyone, mine)
        total: dict[str, float] = {}
        for part in everyone:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled; tensors travel as they are: keep them on CPU)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.leader else None]
        self._collective("broadcast_object_list", dist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for bucket in _buckets(tensors, BUCKET_ELEMENTS):
            flat = torch.cat([t.detach().reshape(-1).float() for t in bucket])
            self._collective("broadcast", dist.broadcast, flat, src=0)
            with torch.no_grad():
                for t, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(piece.view_as(t))

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized() and not self.broken:
            dist.destroy_process_group()


class Commands:
    """Rank 0's side of the command channel to the other ranks (one broadcast per command)."""

    STEP, STATE, NOOP, STOP = "step", "state", "noop", "stop"

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.last_sent = time.monotonic()

    def send(self, kind: str, *payload: Any) -> None:
        if not self.ranks.distributed or not self.ranks.leader:
            return
        self.ranks.broadcast_object((kind, *payload))
        self.last_sent = time.monotonic()

    def keep_alive(self) -> None:
        """A no-op command when none went out for a while: the other ranks wait in a
        collective, and one that waits past the process group's timeout fails."""
        if self.ranks.distributed and time.monotonic() - self.last_sent >= self.ranks.keep_alive_seconds:
            self.send(self.NOOP)


def _buckets(tensors: list[torch.Tensor], size: int):
    bucket: list[torch.Tensor] = []
    n = 0
    for t in tensors:
        if bucket and n + t.numel() > size:
            yield bucket
            bucket, n = [], 0
        bucket.append(t)
        n += t.numel()
    if bucket:
        yield bucket
