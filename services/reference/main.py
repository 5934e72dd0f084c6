"""Reference service: log-probs under the frozen reference policy π_ref."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Sequence

import grpc

from rlhf.reference.servicer import ReferenceServicer
from rlhf.serving import Service, load_settings, run_service
from rlhf.v1 import reference_pb2_grpc
from services.reference.settings import ReferenceSettings

log = logging.getLogger(__name__)


class ReferenceService(Service):
    name = "reference"
    grpc_services = ("rlhf.v1.ReferenceService",)

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        self.servicer = ReferenceServicer(
            max_items=settings.reference_max_items,
            max_tokens=settings.reference_max_tokens,
            max_batch_items=settings.reference_max_batch_items,
            max_wait_ms=settings.reference_max_wait_ms,
        )

    def register(self, server: grpc.aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        from rlhf.models import resolve_device, resolve_model, set_torch_threads
        from rlhf.reference import ReferenceModel

        s = self.settings
        set_torch_threads(s.reference_torch_threads)
        path = await asyncio.to_thread(resolve_model, s.model)
        model = await asyncio.to_thread(
            ReferenceModel, path, s.reference_batching, s.reference_max_batch_tokens, resolve_device(s.reference_device)
        )
        self.servicer.serve(model, s.model if s.model == "demo" else str(path))
        log.info(
            "reference model loaded",
            extra={
                "model": str(path),
                "max_tokens": self.servicer.max_tokens,
                "batching": s.reference_batching,
                "device": str(model.device),
            },
        )

    async def stop(self) -> None:
        await self.servicer.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(ReferenceSettings, sys.argv[1:] if argv is None else argv, prog="rlhf-reference")
    return run_service(ReferenceService(settings), settings)
