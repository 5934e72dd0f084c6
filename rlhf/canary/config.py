"""The canary's settings: one documented field each, defaults chosen by the simulations in
tests/unit/test_canary_decision.py (docs/canary.md has the measured rates).

`CanaryConfig` is a plain pydantic model, as the learner's configs are, so the decision rule
and the controller run in a test without a service; the service that hosts the controller
carries every field as a setting `canary_<name>` (rlhf.serving.settings.config_fields) and
builds the config back from them (config_from), so no default is written twice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CanaryConfig(BaseModel):
    # --- the sequential test (rlhf/canary/decision.py) ------------------------------------
    promote_alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="bound on the false-promotion rate: P(a candidate no better than stable is ever promoted), "
        "however often the evidence is checked",
    )
    rollback_alpha: float = Field(
        0.10,
        gt=0.0,
        lt=1.0,
        description="bound on P(a candidate no worse than stable is ever rolled back for being worse)",
    )
    alert_alpha: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="thumbs-down alert: raised, before the minimum sample too, when the thumbs evidence alone that "
        "the candidate is rated worse than stable passes 1/alert_alpha (P(false alert) ≤ alert_alpha)",
    )
    min_events_per_arm: int = Field(
        50,
        ge=1,
        description="no promotion or rollback for the evidence before each version has this many feedback events "
        "(thumbs on it plus decided comparisons between the two)",
    )
    max_events: int = Field(
        20_000,
        ge=0,
        description="canary duration limit in feedback events on the two versions (ties included); reached "
        "undecided, the candidate is rolled back (0: no limit)",
    )
    max_duration_seconds: float = Field(
        7 * 24 * 3600.0,
        ge=0.0,
        description="canary duration limit in seconds from the candidate's start, by the records' timestamps and "
        "tick(); reached undecided, the candidate is rolled back (0: no limit)",
    )
    prior_scale_log_odds: float = Field(
        0.5,
        gt=0.0,
        le=5.0,
        description="scale τ of the half-normal mixing prior over the effect on the log-odds scale (thumbs: log "
        "odds ratio candidate vs stable; comparisons: logit of the candidate's win rate); 0.5 weighs effects up "
        "to ≈ 2 (0.5 → 0.6 thumbs-up is 0.41)",
    )
    prior_points: int = Field(
        32,
        ge=1,
        le=1024,
        description="points of the discrete mixing prior (the grid is the prior, so the error bound is exact)",
    )
    # --- the controller (rlhf/canary/controller.py) ---------------------------------------
    new_candidate: Literal["replace", "queue", "reject"] = Field(
        "queue",
        description="a new candidate arriving while one is pending: replace (the pending one ends as REPLACED, "
        "its evidence dropped), queue (it starts when the pending one is decided), reject (it is refused)",
    )
    queue_limit: int = Field(
        4,
        ge=1,
        description="new_candidate=queue: candidates that may wait; one more is rejected, naming this limit",
    )
