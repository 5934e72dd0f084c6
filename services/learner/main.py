"""PPO learner service: consumes rollouts, trains, gates and publishes policy versions.

Wiring only: the loop is `rlhf.learner.Learner`, the math `rlhf.ppo`. Every field of
`rlhf.learner.LearnerConfig` is a setting here with a `learner_` prefix:
`RLHF_LEARNER_BATCH_SIZE=32` or `--learner-batch-size 32`.

Under torchrun (rlhf/learner/distributed.py) every rank runs this module with the same
settings: rank 0 is the service (Kafka, checkpoints, publishing, gRPC, metrics), the others
follow its PPO steps and serve nothing:

    torchrun --nproc-per-node 2 -m services.learner
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

import grpc

from rlhf.durability import PidLock, writer_lock
from rlhf.learner import Learner
from rlhf.learner.distributed import Ranks
from rlhf.learner.servicer import LearnerServicer
from rlhf.serving import Service, load_settings, run_service
from rlhf.v1 import learner_pb2_grpc
from services.learner.settings import LearnerSettings, _LearnerSettingsBase

log = logging.getLogger(__name__)


class LearnerService(Service):
    name = "learner"
    grpc_services = ("rlhf.v1.LearnerService",)

    def __init__(self, settings: _LearnerSettingsBase, ranks: Ranks | None = None):
        self.settings = settings
        self.learner: Learner | None = None
        self.servicer = LearnerServicer()  # answers UNAVAILABLE until start() hands it the learner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # the training loop died: exit non-zero
        self._writer: PidLock | None = None  # held from start to stop: one learner per state dir
        self.ranks = ranks

    def register(self, server: grpc.aio.Server) -> None:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        from rlhf.models import resolve_model

        s = self.settings
        # single writer: a second learner over the same checkpoints would train from the same
        # offsets, cut the other's ledger back and overwrite its checkpoints; it fails here
        # instead (StateLocked names the holder; a dead holder's flock is gone with it). On
        # Kubernetes the ReadWriteOnce claim of the learner's StatefulSet fences a second pod too.
        self._writer = writer_lock(Path(s.state_dir) / "learner" / "writer.lock", "learner").acquire()
        model_dir = await asyncio.to_thread(resolve_model, s.model)
        learner = Learner(
            s.learner_config(),
            model_dir,
            s.state_dir,
            s.kafka_bootstrap,
            s.topic_prefix,
            weight_store=s.weight_store_path(),
            canary=s.canary_config(),
            ranks=self.ranks,
        )
        await asyncio.to_thread(learner.start)  # weights loaded, checkpoint restored, consumer assigned
        self.learner = self.servicer.learner = learner
        self._thread = threading.Thread(target=self._run, name="ppo-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.learner.run(self._stop)
        except BaseException:  # RankLost (another rank died) is a SystemExit
            # A learner that cannot train must not keep reporting SERVING: drain and exit
            # non-zero, and let the supervisor restart it (and every rank) from its last checkpoint.
            log.exception("training loop failed; shutting down")
            self._failed = True
            os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.learner is not None:
            self.learner.close()
        if self._writer is not None:
            self._writer.release()
        if self._failed:
            raise RuntimeError("the training loop failed (see above); exiting non-zero for the supervisor")


def join_ranks(settings: _LearnerSettingsBase) -> Ranks:
    """This process's rank among torchrun's (one rank, no process group, without torchrun)."""
    from rlhf.models import resolve_device

    cfg = settings.learner_config()
    return Ranks.from_env(resolve_device(cfg.device), cfg.dist_timeout_seconds)


def follow(settings: _LearnerSettingsBase, ranks: Ranks) -> int:
    """A rank other than 0: the policy and trainer replica, running rank 0's commands until it
    stops (0) or a rank is lost (RankLost: exit 1, torchrun restarts the group)."""
    from rlhf.learner import PPOTrainer, build_policy
    from rlhf.models import resolve_device, resolve_model, set_torch_threads
    from rlhf.serving.logs import setup_logging

    setup_logging(f"learner-rank{ranks.rank}", settings.log_level, settings.log_format)
    # rank 0 decides when the ranks stop (its drain ends with a stop command); torchrun signals
    # every rank at once, and this one must still be there to take that command
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = settings.learner_config()
    set_torch_threads(cfg.torch_threads)
    device = ranks.device(resolve_device(cfg.device))
    policy = build_policy(resolve_model(settings.model), cfg, device)
    log.info("following rank 0", extra={"rank": ranks.rank, "world_size": ranks.world_size, "device": str(device)})
    PPOTrainer(policy, cfg, ranks).follow()
    log.info("rank 0 stopped; exiting", extra={"rank": ranks.rank})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(LearnerSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-learner")
    ranks = join_ranks(settings)
    if not ranks.leader:
        return follow(settings, ranks)
    return run_service(LearnerService(settings, ranks), settings)
