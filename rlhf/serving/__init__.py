"""gRPC service scaffold: settings, logging, health, reflection, metrics, shutdown."""

from rlhf.serving.server import Service, run_service, serve
from rlhf.serving.settings import CommonSettings, GrpcServiceSettings, load_settings

__all__ = ["CommonSettings", "GrpcServiceSettings", "Service", "load_settings", "run_service", "serve"]
