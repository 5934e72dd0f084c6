"""Run tracking: the learner's and the reward trainer's step metrics as TensorBoard event
files, so a run opens beside peers' runs in the tool people already use
(`tensorboard --logdir <state_dir>/runs`).

One small interface, `Tracker.log(step, metrics)` and `close()`, made by `open_tracker` from
one setting per service (`RLHF_LEARNER_TRACKING`, `RLHF_REWARD_TRACKING`):
  - "tensorboard" (default): event files in `<state_dir>/runs/<service>/`
  - "none": nothing is written
  - any other value: a folder, TensorBoard event files there

The writer is torch's `SummaryWriter` (the `tensorboard` package): no format of our own.
A restart from a checkpoint replays the steps after it: the trainer calls `rewind(step)` with
the checkpoint's step, and the writer opens with `purge_step` = step + 1, so TensorBoard
hides what the earlier run logged past the checkpoint and shows each step once. A step
number that goes back without a rewind purges from that step on.

Tracking never stops training: a write that fails is logged once (WARNING, with why),
counted (`rlhf_tracking_errors_total{service}`) and the tracker carries on without it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

TRACKING_HELP = (
    '"tensorboard": step metrics as TensorBoard event files in <state_dir>/runs/<service>/; "none": off; '
    "any other value: a folder to write the event files to"
)

ERRORS = Counter(
    "rlhf_tracking_errors_total",
    "Run-tracking writes that failed (the step trained; its metrics are missing from the event files)",
    ["service"],
)


def validate_tracking(value: str) -> str:
    """The setting, stripped; a ValueError naming it when empty."""
    value = value.strip()
    if not value:
        raise ValueError(f"tracking must be 'tensorboard', 'none' or a folder, got {value!r}")
    return value


def tracking_dir(setting: str, state_dir: str | Path, service: str) -> Path | None:
    """Where `setting` writes the event files of `service`, or None when tracking is off."""
    setting = validate_tracking(setting)
    if setting == "none":
        return None
    if setting == "tensorboard":
        return Path(state_dir) / "runs" / service
    return Path(setting).expanduser()


class Tracker:
    """Step metrics of one service. Non-numeric and non-finite values are skipped (a NaN
    loss is the Prometheus metrics' and the logs' story, and breaks TensorBoard's charts)."""

    def __init__(self, logdir: Path | None, service: str, flush_secs: int = 10):
        self.logdir, self.service, self.flush_secs = logdir, service, flush_secs
        self._writer: Any = None
        self._last_step: int | None = None
        self._purge_step: int | None = None  # for the next writer opened
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.logdir is not None

    def rewind(self, step: int) -> None:
        """Training goes on from `step` (a restored checkpoint): what was logged after it
        before is superseded by what is logged next."""
        self.close()
        self._purge_step, self._last_step = step + 1, None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """`metrics` as scalars `<service>/<name>` at `step`; never raises."""
        if self.logdir is None:
            return
        try:
            if self._last_step is not None and step < self._last_step:
                self.rewind(step - 1)
            if self._writer is None:
                self._open()
            for name, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                self._writer.add_scalar(f"{self.service}/{name}", float(value), global_step=step)
            self._last_step = step
        except Exception as e:  # noqa: BLE001 - tracking must not break training: logged once, counted
            self._failed(e)

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an earlier writer logged at this step or later are hidden
        self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=self._purge_step, flush_secs=self.flush_secs)
        self._purge_step = None

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except Exception as e:  # noqa: BLE001 - as in log()
                self._failed(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:  # noqa: BLE001 - as in log()
                self._failed(e)
            self._writer = None

    def _failed(self, error: Exception) -> None:
        ERRORS.labels(self.service).inc()
        if not self._warned:
            self._warned = True
            log.warning(
                "run tracking failed; training goes on without it (rlhf_tracking_errors_total counts each failure)",
                extra={
                    "service": self.service,
                    "logdir": str(self.logdir),
                    "error": f"{type(error).__name__}: {error}",
                },
            )


def open_tracker(setting: str, state_dir: str | Path, service: str) -> Tracker:
    """The tracker `setting` asks for (see the module docstring); nothing is created on disk
    before the first `log`."""
    return Tracker(tracking_dir(setting, state_dir, service), service)
