"""rlhf: the shared library of the online RLHF serving loop.

Subpackages, by role:
  ppo/      PPO and KL math, pure torch (no grpc, no Kafka)
  bus/      Kafka topics, codecs, producer/consumer, dead-letter handling
  serving/  grpc.aio bootstrap: settings, health, reflection, metrics, shutdown
  models/   model loading, chat templates, demo-model preparation, tiny test models
  v1/       generated protobuf/gRPC stubs (scripts/gen_protos.py; never hand-edited)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-loop")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
