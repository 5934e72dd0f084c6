"""GroupConfig: what a service's <name>_kafka_* settings turn into for EventConsumer."""

from __future__ import annotations

import pytest

from rlhf.bus.consumer import GroupConfig


def test_assign_is_the_default_and_passes_no_group_timeouts():
    assert GroupConfig().consumer_kwargs() == {"mode": "assign"}


def test_group_subscribes_with_its_timeouts():
    kwargs = GroupConfig(membership="group", session_timeout_ms=6000, heartbeat_interval_ms=1000).consumer_kwargs()
    assert kwargs == {
        "mode": "subscribe",
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "max_poll_interval_ms": 300_000,
    }


def test_a_heartbeat_not_below_the_session_timeout_is_refused_naming_both():
    cfg = GroupConfig(membership="group", session_timeout_ms=3000, heartbeat_interval_ms=3000)
    with pytest.raises(ValueError, match=r"heartbeat_interval_ms \(3000\).*session_timeout_ms \(3000\)"):
        cfg.consumer_kwargs()


def test_the_rollout_service_reads_them_as_rlhf_rollout_kafka_settings(monkeypatch):
    from rlhf.serving.settings import config_from
    from services.rollout.settings import GROUP_PREFIX, RolloutSettings

    monkeypatch.setenv("RLHF_ROLLOUT_KAFKA_MEMBERSHIP", "group")
    monkeypatch.setenv("RLHF_ROLLOUT_KAFKA_SESSION_TIMEOUT_MS", "6000")
    cfg = config_from(RolloutSettings(), GroupConfig, GROUP_PREFIX)
    assert cfg.membership == "group" and cfg.session_timeout_ms == 6000
    monkeypatch.setenv("RLHF_ROLLOUT_KAFKA_MEMBERSHIP", "both")
    with pytest.raises(ValueError, match="membership"):
        RolloutSettings()
