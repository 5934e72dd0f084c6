"""PPO learner service: consumes rollouts, trains, gates and publishes policy versions.

Wiring only: the loop is `rlhf.learner.Learner`, the math `rlhf.ppo`. Every field of
`rlhf.learner.LearnerConfig` is a setting here with a `learner_` prefix:
`RLHF_LEARNER_BATCH_SIZE=32` or `--learner-batch-size 32`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Sequence

import grpc

from rlhf.learner import Learner
from rlhf.learner.servicer import LearnerServicer
from rlhf.serving import Service, load_settings, run_service
from rlhf.v1 import learner_pb2_grpc
from services.learner.settings import LearnerSettings, _LearnerSettingsBase

log = logging.getLogger(__name__)


class LearnerService(Service):
    name = "learner"
    grpc_services = ("rlhf.v1.LearnerService",)

    def __init__(self, settings: _LearnerSettingsBase):
        self.settings = settings
        self.learner: Learner | None = None
        self.servicer = LearnerServicer()  # answers UNAVAILABLE until start() hands it the learner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, server: grpc.aio.Server) -> None:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        from rlhf.models import resolve_model

        s = self.settings
        model_dir = await asyncio.to_thread(resolve_model, s.model)
        learner = Learner(
            s.learner_config(),
            model_dir,
            s.state_dir,
            s.kafka_bootstrap,
            s.topic_prefix,
            weight_store=s.weight_store_path(),
            canary=s.canary_config(),
        )
        await asyncio.to_thread(learner.start)  # weights loaded, checkpoint restored, consumer assigned
        self.learner = self.servicer.learner = learner
        self._thread = threading.Thread(target=self._run, name="ppo-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.learner.run(self._stop)
        except Exception:
            # A learner that cannot train must not keep reporting SERVING: drain and exit,
            # and let the supervisor restart it from its last checkpoint.
            log.exception("training loop failed; shutting down")
            os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.learner is not None:
            self.learner.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(LearnerSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-learner")
    return run_service(LearnerService(settings), settings)
