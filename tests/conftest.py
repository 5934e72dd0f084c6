"""Shared fixtures. `broker`: one real Kafka-protocol broker for the whole session."""

import os
import re
import types
import uuid

import pytest

from rlhf.broker import EmbeddedBroker
from rlhf.bus import Topics, ensure_topics, wait_for_broker


@pytest.fixture(scope="session")
def broker():
    """A running broker with `.bootstrap`: the embedded Tansu, or the external broker
    named by RLHF_TEST_KAFKA_BOOTSTRAP (e.g. Apache Kafka) when that is set."""
    external = os.environ.get("RLHF_TEST_KAFKA_BOOTSTRAP")
    if external:
        wait_for_broker(external, timeout_s=30)
        yield types.SimpleNamespace(bootstrap=external)
    else:
        with EmbeddedBroker() as embedded:
            yield embedded


@pytest.fixture
def topics(broker, request) -> Topics:
    """All loop topics, created, under a prefix unique to this test: tests never see
    each other's events, even on a shared external broker."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]
    fresh = Topics(prefix=f"test-{name}-{uuid.uuid4().hex[:8]}")
    ensure_topics(broker.bootstrap, fresh.all())
    return fresh


# --- rlhf.models fixtures: tiny random models with real tokenizers ---------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random LlamaForCausalLM with the real SmolLM2 tokenizer and chat template
    (seed 0, fp32 safetensors, loadable by transformers and vLLM)."""
    from rlhf.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "seed0", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory):
    """Same config as `tiny_model_dir`, other weights (seed 1): for weight-swap tests."""
    from rlhf.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "seed1", seed=1)


@pytest.fixture(autouse=True)
def _no_leaked_kafka_clients(request):
    """A test that leaves a Kafka client open leaks its network thread, which then retries a
    dead broker for the rest of the session (300 threads and a flood of log lines by the end
    of a run, until a test that logs at DEBUG hung on it). Name the test at its teardown."""
    import threading
    import time

    before = {t.ident for t in threading.enumerate()}
    yield

    def leaked() -> list[str]:
        return sorted(
            t.name
            for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and t.name.lower().startswith("kafka")
        )

    deadline = time.monotonic() + 5  # a closing client (a watch ending its last Metadata round) lets go
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.1)
    if names := leaked():
        pytest.fail(f"{request.node.nodeid} left Kafka clients open: {names}", pytrace=False)
