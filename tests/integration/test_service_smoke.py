"""Each service starts from its real entrypoint with tiny sizes and reports SERVING on the
standard gRPC health service (the gateway: /readyz), then drains on SIGTERM and exits 0."""

import signal
import uuid

import pytest

from rlhf.serving.client import check_health
from tests.procs import run_service

GRPC_SERVICES = ["generator", "reward", "reference", "learner", "rollout"]


@pytest.fixture
def service_env(broker, tiny_model_dir):
    return {
        "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap,
        "RLHF_TOPIC_PREFIX": f"smoke-{uuid.uuid4().hex[:8]}",
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_REWARD_BACKBONE": "tiny",
        "RLHF_BACKEND": "transformers",
    }


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_grpc_service_serves_health_and_drains(name, tmp_path, service_env):
    with run_service(name, tmp_path, env=service_env, timeout=180) as svc:
        assert check_health(svc.address) == "SERVING"
        rc = svc.stop(signal.SIGTERM)
        assert check_health(svc.address, timeout=1) == "UNREACHABLE"
    assert rc == 0, svc.log()


def test_metrics_endpoint_exports_readiness(tmp_path, service_env):
    import urllib.request

    with run_service("reference", tmp_path, env=service_env, timeout=180) as svc:
        body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    assert 'rlhf_service_ready{service="reference"} 1.0' in body
