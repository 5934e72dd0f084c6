"""One source per setting: every field is declared once, library configs restate nothing,
renamed settings keep their old environment variables, and what the learner decides for the
rollout workers travels in its PolicyUpdates instead of being configured twice."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from pydantic import BaseModel

from rlhf.bus.consumer import GroupConfig
from rlhf.cli import settings_classes
from rlhf.learner.canary import LearnerCanaryConfig
from rlhf.learner.config import LearnerConfig
from rlhf.reward.config import LoopConfig, TrainerConfig
from rlhf.reward.reliability import ReliabilityConfig
from rlhf.rollout import PolicyBudget, WorkerConfig
from rlhf.serving import settings as common
from rlhf.serving.settings import config_from

SETTINGS = settings_classes()
LIBRARY_CONFIGS = {
    LearnerConfig,
    TrainerConfig,
    LoopConfig,
    WorkerConfig,
    LearnerCanaryConfig,
    ReliabilityConfig,
    GroupConfig,
}


def origin(cls: type, name: str) -> type:
    """The most basic class that declares field `name` (a service may redeclare a common
    field only to give it its own default)."""
    return [k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {})][-1]


def test_no_field_is_defined_by_two_services():
    seen: dict[str, tuple[str, type]] = {}
    for svc, cls in SETTINGS.items():
        for name in cls.model_fields:
            home = origin(cls, name)
            if name in seen:
                other, other_home = seen[name]
                assert home is other_home, (
                    f"{name!r} is declared by both {other} ({other_home.__qualname__}) and "
                    f"{svc} ({home.__qualname__}): declare it once in rlhf.serving.settings"
                )
                assert home.__module__ == common.__name__, f"{name!r}, shared, lives in {home.__module__}"
            seen[name] = (svc, home)


def test_a_redeclared_common_field_changes_only_its_default():
    for svc, cls in SETTINGS.items():
        for name, f in cls.model_fields.items():
            home = origin(cls, name)
            if home is not cls and home.__module__ == common.__name__ and name in home.model_fields:
                assert f.annotation == home.model_fields[name].annotation, f"{svc}.{name} changes the type"


def test_every_library_config_field_is_a_setting_with_the_same_default():
    covered = set()
    for svc, cls in SETTINGS.items():
        settings = cls()
        for prefix, configs in cls.library_configs.items():
            for config in configs:
                covered.add(config)
                assert issubclass(config, BaseModel) and not dataclasses.is_dataclass(config)
                for name, f in config.model_fields.items():
                    s = cls.model_fields[prefix + name]
                    assert (s.annotation, s.get_default(), s.description) == (
                        f.annotation,
                        f.get_default(),
                        f.description,
                    ), f"{svc}: {prefix + name} differs from {config.__name__}.{name}"
                    assert f.description, f"{config.__name__}.{name} has no description"
                # built from the settings by the one generic function: the config's own defaults
                assert config_from(settings, config, prefix) == config(), config.__name__
    assert covered == LIBRARY_CONFIGS


def test_the_live_prompt_limit_is_the_reward_services_default():
    # the rollout worker loads no torch, so it cannot import TrainerConfig: it restates this one
    # number, and this test keeps the two equal
    from rlhf.rollout.feeds import MAX_LIVE_PROMPT_CHARS

    assert MAX_LIVE_PROMPT_CHARS == TrainerConfig.model_fields["max_prompt_chars"].get_default()


def test_durations_end_in_seconds():
    for svc, cls in SETTINGS.items():
        for name in cls.model_fields:
            assert not name.endswith(("_s", "_secs", "_sec")), f"{svc}.{name}: durations end in _seconds"


def test_a_renamed_setting_keeps_its_old_environment_variable(monkeypatch):
    for svc, cls in SETTINGS.items():
        for old, new in cls.renamed.items():
            assert new in cls.model_fields and old not in cls.model_fields, (svc, old, new)
    rollout = SETTINGS["rollout"]
    monkeypatch.setenv("RLHF_VERSION_POLL_S", "0.3")
    monkeypatch.setenv("RLHF_SAMPLES_PER_PROMPT", "2")
    s = rollout()
    assert (s.rollout_version_poll_seconds, s.rollout_samples_per_prompt) == (0.3, 2)
    assert config_from(s, WorkerConfig, "rollout_").version_poll_seconds == 0.3
    monkeypatch.setenv("RLHF_ROLLOUT_VERSION_POLL_SECONDS", "0.7")  # the new name wins
    assert rollout().rollout_version_poll_seconds == 0.7
    monkeypatch.setenv("RLHF_LEARNER_WEIGHT_STORE_DIR", "/tmp/weights-here")
    assert str(SETTINGS["learner"]().weight_store_path()) == "/tmp/weights-here"
    monkeypatch.setenv("RLHF_MAX_N", "3")  # the gateway's limit on n (the generator's has the same old name)
    assert SETTINGS["gateway"]().max_choices == 3 and SETTINGS["generator"]().max_n == 3


def test_the_weight_store_is_one_setting_of_the_learner_and_the_generator(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_WEIGHT_STORE", str(tmp_path))
    assert SETTINGS["learner"]().weight_store_path() == SETTINGS["generator"]().weight_store_path() == tmp_path
    monkeypatch.delenv("RLHF_WEIGHT_STORE")
    monkeypatch.setenv("RLHF_STATE_DIR", str(tmp_path))
    assert SETTINGS["learner"]().weight_store_path() == tmp_path / "weights"


# --- what the learner announces --------------------------------------------------------


def test_the_rollout_worker_configures_nothing_the_learner_decides():
    fields = set(SETTINGS["rollout"].model_fields)
    assert not fields & {"rollouts_per_version", "max_policy_lag", "rollout_temperature", "rollout_max_policy_lag"}
    assert "temperature" not in WorkerConfig.model_fields


def test_the_budget_is_closed_until_the_learner_announces_its_numbers():
    b = PolicyBudget()
    assert not b.known and not b.try_reserve(1) and b.remaining == 0
    assert b.advance(0, rollouts_per_version=4, max_policy_lag=1)
    assert b.known and b.budget == 8 and b.try_reserve(2)
    b.settle(2, 2)
    # an announcement without numbers (0) keeps the last ones; one with numbers replaces them
    assert b.advance(1) and b.budget == 8 and b.produced == 0
    assert b.advance(2, rollouts_per_version=2, max_policy_lag=0) and b.budget == 2


def test_the_learner_announces_batch_size_times_publish_every_its_lag_and_temperature():
    from rlhf.learner.loop import Learner
    from rlhf.v1 import events_pb2

    learner = Learner.__new__(Learner)  # worker_terms reads only the config
    learner.cfg = LearnerConfig(
        batch_size=8, minibatch_size=4, micro_batch_size=4, publish_every=3, max_policy_lag=1, temperature=0.7
    )
    terms = learner.worker_terms()
    assert terms == {"rollouts_per_version": 24, "max_policy_lag": 1, "temperature": 0.7}
    ev = events_pb2.PolicyUpdate(version=0, **terms)
    assert (ev.rollouts_per_version, ev.max_policy_lag, ev.temperature) == (24, 1, pytest.approx(0.7))


def test_the_worker_follows_the_announced_terms():
    from rlhf.rollout.sources import PromptMixer
    from rlhf.rollout.worker import RolloutLoop
    from rlhf.v1 import events_pb2

    async def go():
        import grpc

        ch = grpc.aio.insecure_channel("127.0.0.1:9")  # never called
        loop = RolloutLoop(
            WorkerConfig(),
            PromptMixer([{"prompt_id": "p", "messages": []}], 0.0, 1),
            PolicyBudget(),
            None,
            "t",
            ch,
            ch,
            ch,
        )
        assert loop.temperature is None and not loop.budget.known
        await loop.on_policy_updates(
            [events_pb2.PolicyUpdate(version=0, rollouts_per_version=4, max_policy_lag=2, temperature=0.5)]
        )
        assert (loop.budget.budget, loop.temperature) == (12, 0.5)
        await loop.on_policy_updates([events_pb2.PolicyUpdate(version=1)])  # no numbers: the last ones stay
        assert (loop.budget.budget, loop.temperature, loop.budget.version) == (12, 0.5, 1)
        await ch.close()

    asyncio.run(go())
