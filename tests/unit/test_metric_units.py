"""Metric names carry their unit: a KL or other log-ratio in nats ends in `_nats`, a share
of something (an accuracy, the fraction of tokens clipped) ends in `_ratio`, as Prometheus'
naming conventions ask (base units, the unit a suffix)."""

from __future__ import annotations

import importlib
import re

from prometheus_client import REGISTRY

MODULES = [
    "rlhf.bus.metrics",
    "rlhf.generation.follower",
    "rlhf.generation.metrics",
    "rlhf.learner.metrics",
    "rlhf.outbox",
    "rlhf.reward.metrics",
    "rlhf.rollout.metrics",
    "rlhf.serving.auth",
    "rlhf.serving.batcher",
    "rlhf.serving.server",
    "rlhf.tracking",
    "services.gateway.metrics",
]

# a coefficient multiplies a KL (1/nat); it is not one
_KL = re.compile(r"(^|_)kl(_|$)(?!coef)")
_SHARE = re.compile(r"(^|_)(accuracy|frac|fraction|clipfrac|share|percent)(_|$)")


def exported() -> set[str]:
    for name in MODULES:
        importlib.import_module(name)
    return {family.name for family in REGISTRY.collect() if family.name.startswith("rlhf_")}


def test_there_are_metrics_to_check():
    names = exported()
    assert len(names) > 50
    assert {"rlhf_learner_kl_nats", "rlhf_learner_drift_kl_budget_nats", "rlhf_rm_accuracy_ratio"} <= names


def test_kl_metrics_are_in_nats():
    wrong = sorted(n for n in exported() if _KL.search(n) and not n.endswith("_nats"))
    assert wrong == []


def test_shares_are_ratios():
    wrong = sorted(n for n in exported() if _SHARE.search(n) and not n.endswith("_ratio"))
    assert wrong == []


def test_the_checks_catch_the_old_names():
    assert _KL.search("rlhf_learner_drift_kl_budget") and _KL.search("rlhf_learner_approx_kl")
    assert not _KL.search("rlhf_learner_kl_coef")
    assert _SHARE.search("rlhf_learner_clipfrac") and _SHARE.search("rlhf_rm_accuracy")
