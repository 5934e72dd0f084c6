"""Backpressure: the rollout worker never runs more than `max_policy_lag` versions ahead.

The learner turns every `rollouts_per_version` rollouts into one new policy version (its
PPO batch × publish_every). If the worker keeps sampling from version V while the learner
moves on, the k-th batch of rollouts from V is trained on when the learner is at V + k. So
the worker may produce at most

    budget = rollouts_per_version × (max_policy_lag + 1)

rollouts per policy version, and then waits until the loop has moved on: a newer version is
served by the generator, or the learner announced a newer version on rlhf.policy-updates
(PROMOTED, or REJECTED by the drift gate: either way it consumed a batch). With
max_policy_lag = 0 the worker produces exactly one learner batch per version: on-policy PPO.
"""

from __future__ import annotations

import asyncio


class PolicyBudget:
    def __init__(self, rollouts_per_version: int, max_policy_lag: int):
        if rollouts_per_version < 1 or max_policy_lag < 0:
            raise ValueError("rollouts_per_version must be ≥ 1 and max_policy_lag ≥ 0")
        self.budget = rollouts_per_version * (max_policy_lag + 1)
        self.version = -1          # newest version seen served or announced
        self.produced = 0          # rollouts produced since `version` appeared
        self.reserved = 0          # rollouts being produced now
        self._changed = asyncio.Event()

    def observe(self, version: int) -> bool:
        """A version was seen (a Generate response, GetInfo, a PolicyUpdate); True if newer."""
        if version <= self.version:
            return False
        self.version, self.produced = version, 0
        self._changed.set()
        return True

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.produced - self.reserved)

    def try_reserve(self, n: int) -> bool:
        """Claim room for `n` rollouts (a group is never split across the limit's edge: a
        group larger than what is left waits, unless it alone is larger than the budget)."""
        if self.remaining >= n or (self.produced + self.reserved == 0):
            self.reserved += n
            return True
        return False

    def settle(self, reserved: int, produced: int) -> None:
        self.reserved -= reserved
        self.produced += produced

    async def changed(self, timeout: float) -> None:
        """Wait until a newer version is observed, or `timeout` seconds."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
