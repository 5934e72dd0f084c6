"""Backpressure: the rollout worker never runs more than `max_policy_lag` versions ahead.

The learner turns every `rollouts_per_version` rollouts into one new policy version (its
PPO batch × publish_every). Both numbers are the learner's: it announces them in every
PolicyUpdate (with the sampling temperature its log-probs assume), and the worker follows
the latest announcement; until the first one arrives the worker makes nothing (the learner
announces its serving version when it starts, and the worker reads rlhf.policy-updates from
the start, so a running learner's terms are known at once). If the worker keeps sampling from
version V while the learner moves on, the k-th batch of rollouts from V is trained on when the learner is at V + k. So
the worker may produce at most

    budget = rollouts_per_version × (max_policy_lag + 1)

rollouts per policy version, and then waits until the learner reports that the loop moved
on: a PolicyUpdate on rlhf.policy-updates, whatever its action (PROMOTED or REJECTED: the
learner consumed a batch either way; ROLLED_BACK: an operator moved the serving version).
Each announcement starts a new budget. With max_policy_lag = 0 the worker produces exactly
one learner batch per version: on-policy PPO.

A new budget is what the last one left *less the backlog*: rollouts produced and not yet
trained or dropped are still ahead of anything sampled now, so the rule that holds the lag is
on the rollouts outstanding — never more than `budget` of them — not on the rollouts made
per announcement. (Counting per announcement alone let a worker faster than the learner
pile up a queue whose tail went stale: in a 135M win-rate run the learner dropped 208
stale rollouts against 256 trained.) The backlog is what the worker produced less
what the learner trained and dropped since, from the learner's own counts (read just before
each announcement is followed); when the learner cannot be asked, an announcement is taken
to have consumed one learner batch. The backlog holds back at most `budget − per_version`:
every announcement opens at least one learner batch, so a wrong count slows the worker but
never stalls the loop. This is for one worker (`membership=assign`, what `rlhf up` runs);
workers that share the budget keep the per-announcement rule, since the learner's counts
are the whole loop's and no worker knows which of them were its own.

Only the learner's announcements count, and their version *numbers* are never compared: the
version a generator reports (in a Generate response or GetInfo) does not move the budget, so
a generator made to serve a bogus version 999999 cannot hold the worker back until the
learner "catches up", and a rollback to an older number resumes it like any other
announcement. An announcement with a negative version is ignored (counted by the caller).

One more way the loop moves on without an announcement: the learner *drops* rollouts (stale:
sampled before a rollback reached the generator, or off its lineage) instead of training on
them, and may then wait for fresh ones while the worker waits for a version. So the worker
also reads the learner's own counts (LearnerService.GetStatus: rollouts trained and dropped
stale): when the learner has dropped some of this budget's rollouts and what is left of it
(produced, not yet trained or dropped) is less than one learner batch, it cannot make a
version from them, and a new budget opens (`learner_counts`). Without drops it never
fires, so normal backpressure is exactly the announcement rule above.

Several workers (membership=group) share one budget, not one each: the budget is the
learner's, for the loop, and N workers each spending all of it would run N times as far
ahead. Its G = budget // group_size prompt groups are dealt to the partitions of
rlhf.interactions, G // P to each of the P partitions and one more to G % P of them, taken
in turn from one announcement to the next (so no partition's live prompts wait for ever when
G < P); a worker may produce the groups of the partitions it holds (`set_share`). The
shares of all partitions add up to G groups, so the workers together never exceed the
budget however Kafka spreads the partitions. Why partitions and not a count of workers:
Kafka's group protocol already tells every worker which partitions it holds and moves them
when a worker leaves, so no worker needs to know how many others there are and nothing new
has to agree on it.

A partition taken over mid-budget (its worker died or left) brings its share from the
next announcement on, not at once: the worker that held it may have spent that share
already, and spending it again would run the loop past its budget. Until then the
taken-over share is closed, unless the worker is held back for `open_takeover`'s grace
without an announcement: then the dead worker had not made enough for a learner batch,
the learner waits for rollouts nobody may make, and the share opens (at most one share
too many, once, which the learner's staleness check bounds).
"""

from __future__ import annotations

import asyncio


class PolicyBudget:
    def __init__(self, rollouts_per_version: int | None = None, max_policy_lag: int | None = None):
        """Without numbers the budget is closed until an announcement brings them."""
        self.per_version = 0  # the learner's rollouts per version (0: not announced yet)
        self.whole = 0  # the learner's budget for the whole loop
        self._share: tuple[frozenset[int], int, int] | None = None  # (partitions counted, of how many, group size)
        self._held: frozenset[int] = frozenset()  # partitions held now (counted, or taken over mid-budget)
        if rollouts_per_version is not None:
            self.set_terms(rollouts_per_version, max_policy_lag or 0)
        self.version = -1  # the version of the learner's last announcement (-1: none yet)
        self.announcements = 0  # learner announcements seen
        self.produced = 0  # rollouts produced since the last announcement
        self.backlog = 0  # rollouts produced and not yet trained or dropped, as best known
        self.carried = 0  # the part of the backlog that holds this budget back
        self._last_handled: int | None = None  # learner trained + dropped at the last budget opened
        self.reserved = 0  # rollouts being produced now
        self.releases = 0  # budgets opened by the learner's counts (see the module docstring)
        self._base: tuple[int, int] | None = None  # learner (trained, dropped) when this budget opened
        self._changed = asyncio.Event()

    def set_terms(self, rollouts_per_version: int, max_policy_lag: int) -> None:
        if rollouts_per_version < 1 or max_policy_lag < 0:
            raise ValueError("rollouts_per_version must be ≥ 1 and max_policy_lag ≥ 0")
        self.per_version = rollouts_per_version
        self.whole = rollouts_per_version * (max_policy_lag + 1)

    def set_share(self, partitions: list[int] | None, total_partitions: int = 1, group_size: int = 1) -> None:
        """Share the budget with other workers: this one holds `partitions` of the
        `total_partitions` of rlhf.interactions and makes groups of `group_size` rollouts
        (module docstring: a partition gained mid-budget counts from the next announcement).
        None: the whole budget is this worker's (one worker)."""
        if partitions is None:
            self._share, self._held = None, frozenset()
        else:
            if total_partitions < 1 or group_size < 1:
                raise ValueError("total_partitions and group_size must be ≥ 1")
            held = frozenset(partitions)
            counted = held if self.announcements == 0 or self._share is None else held & self._share[0]
            self._share, self._held = (counted, total_partitions, group_size), held
        self._changed.set()

    @property
    def taken_over(self) -> frozenset[int]:
        """Partitions held whose share opens at the next announcement."""
        return self._held - self._share[0] if self._share is not None else frozenset()

    def open_takeover(self) -> bool:
        """Count the taken-over partitions now (the worker waited its grace with no
        announcement); True if there were any."""
        if not self.taken_over:
            return False
        self._share = (self._held, *self._share[1:])
        self._changed.set()
        return True

    @property
    def budget(self) -> int:
        """Rollouts this worker may produce per announcement: the whole budget, or its share."""
        if self._share is None or self.whole == 0:
            return self.whole
        partitions, total, n = self._share
        groups = max(1, self.whole // n)
        each, extra = divmod(groups, total)
        turn = self.announcements
        return n * sum(each + (1 if (p - turn) % total < extra else 0) for p in partitions)

    @property
    def known(self) -> bool:
        """The learner's numbers are known (announced, or given at construction)."""
        return self.per_version > 0

    def advance(
        self,
        version: int,
        counts: tuple[int, int] | None = None,
        rollouts_per_version: int = 0,
        max_policy_lag: int = 0,
    ) -> bool:
        """The learner announced `version` (any action): a new budget starts, under the
        numbers the announcement carries (`rollouts_per_version` 0: it carries none, the last
        ones stay). `counts`: the learner's (rollouts trained, dropped stale) read just
        before, if it was reachable. False (and nothing changes) for a negative version,
        which no learner announces."""
        if version < 0:
            return False
        if rollouts_per_version > 0:
            self.set_terms(rollouts_per_version, max(0, max_policy_lag))
        self.version = version
        self.announcements += 1
        self._open(counts)
        return True

    def learner_counts(self, trained: int, dropped: int) -> bool:
        """The learner's GetStatus counts, read while held back; True if they open a new
        budget (it dropped rollouts and cannot make a batch from the rest)."""
        if not self.known:
            return False
        if self._base is None or trained < self._base[0] or dropped < self._base[1]:
            self._base = (trained, dropped)  # first sight, or a learner restored from an older checkpoint
            return False
        handled = (trained - self._base[0]) + (dropped - self._base[1])
        # the learner's counts are the whole loop's: a sharing worker takes its share of them
        part = self.budget / self.whole if self._share is not None and self.whole else 1.0
        if dropped > self._base[1] and self.produced - handled * part < self.per_version * part:
            self.releases += 1
            self._open((trained, dropped))
            return True
        return False

    def _open(self, counts: tuple[int, int] | None) -> None:
        if self.known and self._share is None:  # one worker: the backlog holds the next budget back
            handled = None if counts is None else counts[0] + counts[1]
            if handled is not None and self._last_handled is not None and handled >= self._last_handled:
                consumed = handled - self._last_handled
            else:  # no counts, first sight of them, or a learner restored from an older checkpoint
                consumed = self.per_version
            self._last_handled = handled if handled is not None else self._last_handled
            self.backlog = max(0, self.backlog - consumed)
            self.carried = min(self.backlog, self.whole - self.per_version)
        self.produced, self._base = 0, counts
        if self._share is not None:  # a new budget: every partition held counts
            self._share = (self._held, *self._share[1:])
        self._changed.set()

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.carried - self.produced - self.reserved)

    def try_reserve(self, n: int) -> bool:
        """Claim room for `n` rollouts (a group is never split across the limit's edge: a
        group larger than what is left waits, unless it alone is larger than the budget).
        Nothing while the learner's numbers are unknown."""
        if not self.known:
            return False
        if self._share is not None:  # shares are whole groups: no group larger than what is left
            ok = self.remaining >= n
            if ok:
                self.reserved += n
            return ok
        if self.remaining >= n or (self.carried + self.produced + self.reserved == 0):
            self.reserved += n
            return True
        return False

    def settle(self, reserved: int, produced: int) -> None:
        self.reserved -= reserved
        self.produced += produced
        self.backlog += produced

    async def changed(self, timeout: float) -> None:
        """Wait until the learner announces a version, or `timeout` seconds."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
