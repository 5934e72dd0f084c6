"""Run tracking (rlhf/tracking.py): step metrics as TensorBoard event files, read back with
TensorBoard's own EventAccumulator; "none" writes nothing; a replay after a restart shows
each step once; a tracker that cannot write never stops training. Then the real trainers:
an RM step (OnlineRewardLoop's bookkeeping of each step) and a PPO step of the learner,
against the real broker, write their stats and the drift KL of the version."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf.learner import Learner, LearnerConfig
from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, resolve_backbone
from rlhf.reward.config import LoopConfig
from rlhf.reward.online import OnlineRewardLoop
from rlhf.testing.preferences import SyntheticPreference
from rlhf.tracking import Tracker, open_tracker, tracking_dir
from services.learner.settings import LearnerSettings
from services.reward.settings import RewardSettings
from tests.integration.test_learner_service import _record, sampler  # noqa: F401 - sampler: a fixture


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file in `logdir`, as TensorBoard reads it."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def errors(service: str) -> float:
    return REGISTRY.get_sample_value("rlhf_tracking_errors_total", {"service": service}) or 0.0


def test_step_metrics_are_read_back_by_tensorboard(tmp_path):
    tracker = open_tracker("tensorboard", tmp_path, "learner")
    assert not (tmp_path / "runs").exists()  # nothing on disk before the first step
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 0.5 * step, "kl": 0.01, "nan": math.nan, "note": "skipped", "flag": True})
    tracker.close()
    got = scalars(tmp_path / "runs" / "learner")
    assert got["learner/loss"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert [s for s, _ in got["learner/kl"]] == [1, 2, 3] and got["learner/kl"][0][1] == pytest.approx(0.01)
    assert set(got) == {"learner/loss", "learner/kl"}  # non-finite, text and bool values are not scalars


def test_none_writes_nothing_and_a_folder_is_used_as_given(tmp_path):
    off = open_tracker("none", tmp_path, "reward")
    off.log(1, {"loss": 1.0})
    off.close()
    assert not off.enabled and list(tmp_path.iterdir()) == []

    elsewhere = tmp_path / "my-runs" / "rm-lr-1e-5"
    assert tracking_dir(str(elsewhere), tmp_path / "state", "reward") == elsewhere
    tracker = open_tracker(str(elsewhere), tmp_path / "state", "reward")
    tracker.log(7, {"loss": 2.0})
    tracker.close()
    assert scalars(elsewhere) == {"reward/loss": [(7, 2.0)]} and not (tmp_path / "state").exists()


def test_a_replay_after_a_restart_shows_each_step_once(tmp_path):
    first = open_tracker("tensorboard", tmp_path, "learner")
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.close()
    # the new process restored the checkpoint of step 3 and trains steps 4, 5, 6 again
    second = open_tracker("tensorboard", tmp_path, "learner")
    second.rewind(3)
    for step in range(4, 7):
        second.log(step, {"loss": 10.0 * step})
    second.close()
    assert scalars(tmp_path / "runs" / "learner")["learner/loss"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_a_tracker_that_cannot_write_is_logged_once_counted_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the folder should be")
    tracker = Tracker(blocker / "learner", "broken")
    before = errors("broken")
    with caplog.at_level(logging.WARNING, logger="rlhf.tracking"):
        for step in (1, 2, 3):
            tracker.log(step, {"loss": 1.0})  # must not raise
        tracker.close()
    assert errors("broken") == before + 3
    warnings = [r for r in caplog.records if "run tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and "broken" == warnings[0].service


def test_the_setting_of_each_service(monkeypatch):
    assert LearnerSettings().learner_config().tracking == "tensorboard"
    monkeypatch.setenv("RLHF_LEARNER_TRACKING", "none")
    monkeypatch.setenv("RLHF_REWARD_TRACKING", "/tmp/elsewhere")
    assert LearnerSettings().learner_config().tracking == "none"
    assert RewardSettings().reward_tracking == "/tmp/elsewhere"
    with pytest.raises(ValidationError, match="tracking must be 'tensorboard', 'none' or a folder"):
        LoopConfig(tracking=" ")


def test_each_reward_model_step_is_tracked(tmp_path):
    backbone = resolve_backbone("tiny", cache_dir=tmp_path / "rm")
    trainer = OnlineRewardTrainer(
        load_reward_model(backbone, max_tokens=32), TrainerConfig(lr=1e-3, train_batch_size=8)
    )
    loop = OnlineRewardLoop(
        make_trainer=lambda: trainer,
        make_consumer=lambda: None,
        producer=None,
        updates_topic="unused",
        checkpoints=None,
        backbone=backbone,
        cfg=LoopConfig(),
        on_swap=lambda snapshot: None,
        tracker=open_tracker("tensorboard", tmp_path / "state", "reward"),
    )
    loop.trainer = trainer
    gen = SyntheticPreference(seed=3)
    steps = []
    for stats in trainer.train(trainer.ingest([gen.comparison_event() for _ in range(24)]).examples):
        loop._record(stats)  # what OnlineRewardLoop.iterate does with each step's stats
        steps.append(dict(stats))
    loop.tracker.close()
    got = scalars(tmp_path / "state" / "runs" / "reward")
    assert len(steps) == 3
    for name in ("loss", "online_accuracy", "grad_norm"):
        assert [s for s, _ in got[f"reward/{name}"]] == [1, 2, 3]
        assert [v for _, v in got[f"reward/{name}"]] == pytest.approx([s[name] for s in steps], rel=1e-6)


@pytest.mark.parametrize("tracking", ["tensorboard", "none"])
def test_a_ppo_step_and_its_versions_drift_kl_are_tracked(broker, topics, tiny_model_dir, tmp_path, sampler, tracking):  # noqa: F811
    cfg = LearnerConfig(
        batch_size=4,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=1,
        drift_max_new_tokens=4,
        drift_samples_per_prompt=1,
        torch_threads=1,
        tracking=tracking,
    )
    state = tmp_path / "state"
    learner = Learner(cfg, tiny_model_dir, state, broker.bootstrap, topics.prefix)
    learner.start()
    try:
        learner.intake.add([_record(topics.rollouts, e, i) for i, e in enumerate(sampler(4, version=0, seed=5))])
        learner._train(learner.intake.take_batch())
        stats, v1 = learner.status()["last_stats"], next(v for v in learner.versions() if v.version == 1)
    finally:
        learner.close()
    if tracking == "none":
        assert not (state / "runs").exists()
        return
    got = scalars(state / "runs" / "learner")
    finite = {k: v for k, v in stats.items() if math.isfinite(v)}
    assert finite and all(got[f"learner/{k}"] == [(1, pytest.approx(v, rel=1e-6))] for k, v in finite.items())
    assert got["learner/drift_kl"] == [(1, pytest.approx(v1.kl_to_reference, rel=1e-6, abs=1e-9))]
    assert got["learner/drift_promoted"] == [(1, float(v1.promoted))]
