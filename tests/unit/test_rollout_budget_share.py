"""Workers that share the learner's budget by partition (rlhf/rollout/budget.py): together
never more than the budget, all of it when every partition is held, and a dead worker's
share taken over with its partitions."""

from __future__ import annotations

import pytest

from rlhf.rollout.budget import PolicyBudget


def spend(budget: PolicyBudget, n: int) -> int:
    """Reserve and produce groups of n until the budget holds this worker back."""
    made = 0
    while budget.try_reserve(n):
        budget.settle(n, n)
        made += n
    return made


@pytest.mark.parametrize(
    ("per_version", "lag", "n", "owners"),
    [
        (4, 1, 2, [[0], [1]]),  # 4 groups over 2 partitions: 2 each
        (4, 0, 2, [[0], [1], [2]]),  # 2 groups over 3 partitions: one worker waits its turn
        (6, 1, 4, [[0, 2], [1]]),  # 3 groups, 3 partitions, uneven holdings
        (8, 0, 3, [[0, 1, 2, 3]]),  # one worker holding every partition: 2 whole groups of the 8
        (3, 0, 4, [[0], [1]]),  # a group larger than the whole budget: exactly one group, like one worker
    ],
)
def test_sharing_workers_together_stay_within_the_budget(per_version, lag, n, owners):
    total = sum(len(o) for o in owners)
    workers = [PolicyBudget() for _ in owners]
    for w, parts in zip(workers, owners):
        w.set_share(parts, total, n)
    whole = per_version * (lag + 1)
    groups = max(1, whole // n)
    for version in range(total + 2):  # every partition gets its turn at the extra groups
        for w in workers:
            w.advance(version, None, per_version, lag)
        made = sum(spend(w, n) for w in workers)
        assert made == groups * n, (version, [w.budget for w in workers])
        assert made <= max(whole, n)


def test_a_dead_workers_partitions_bring_their_share_from_the_next_announcement():
    a, b = PolicyBudget(), PolicyBudget()
    a.set_share([0], 2, 2)
    b.set_share([1], 2, 2)
    for w in (a, b):
        w.advance(0, None, 4, 1)
    assert spend(a, 2) == 4 and spend(b, 2) == 4
    b.set_share([0, 1], 2, 2)  # a died: the group's rebalance gave b its partition ...
    assert b.taken_over == {0} and spend(b, 2) == 0  # ... whose share a may have spent already
    b.advance(1, None)
    assert not b.taken_over and spend(b, 2) == 8


def test_a_taken_over_share_opens_after_the_grace_and_a_lost_one_closes_at_once():
    a = PolicyBudget()
    a.set_share([0], 2, 2)
    a.advance(0, None, 4, 0)  # 2 groups: 1 per partition
    a.set_share([0, 1], 2, 2)
    assert spend(a, 2) == 2
    assert a.open_takeover() and spend(a, 2) == 2  # the dead worker had made nothing: the learner waits
    assert not a.open_takeover()
    a.advance(1, None)
    a.set_share([1], 2, 2)  # partition 0 went to a new worker: its share leaves with it
    assert a.budget == 2


def test_no_partitions_no_rollouts_and_one_worker_keeps_the_whole_budget():
    idle = PolicyBudget(4, 1)
    idle.set_share([], 2, 2)
    idle.advance(0, None)
    assert spend(idle, 2) == 0
    alone = PolicyBudget(4, 1)
    alone.advance(0, None)
    assert spend(alone, 2) == 8
    alone.set_share(None)
    assert alone.budget == 8
