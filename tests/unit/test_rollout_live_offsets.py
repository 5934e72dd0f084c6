"""Live prompts are committed after processing (rlhf/rollout/feeds.py): per partition the
commit is the lowest offset not done with, and a prompt let go counts as done."""

from __future__ import annotations

from rlhf.rollout.feeds import LiveOffsets
from rlhf.rollout.sources import PromptMixer

PROMPT_SET = [{"id": "p", "messages": [{"role": "user", "content": "q"}]}]


def test_the_commit_waits_for_the_lowest_prompt_not_done():
    offsets = LiveOffsets()
    for o in range(3):
        offsets.read(0, o, pending=True)
    offsets.read(1, 7, pending=False)  # dead-lettered: done at once
    assert offsets.to_commit() == {0: 0, 1: 8}
    offsets.committed({0: 0, 1: 8})
    offsets.done(0, 1)  # out of order: 0 still in flight
    assert offsets.to_commit() == {}
    offsets.done(0, 0)
    assert offsets.to_commit() == {0: 2}
    offsets.done(0, 2)
    assert offsets.to_commit([0]) == {0: 3} and offsets.to_commit([1]) == {}
    assert offsets.already_read(0, 2) and not offsets.already_read(0, 3)
    offsets.forget([0])
    assert not offsets.already_read(0, 2)


def test_the_mixer_hands_back_what_it_lets_go_and_drops_a_partitions_prompts():
    mixer = PromptMixer(PROMPT_SET, live_fraction=1.0, live_buffer=2)
    user = [{"role": "user", "content": "hi"}]
    assert mixer.add_live("a", user, (0, 0)) == []
    assert [i.origin for i in mixer.add_live("b", [{"role": "assistant", "content": "x"}], (0, 1))] == [(0, 1)]
    assert mixer.add_live("c", user, (1, 0)) == []
    assert [i.origin for i in mixer.add_live("d", user, (1, 1))] == [(0, 0)]  # the buffer was full
    assert mixer.drop_live({1}) == 2 and not mixer.live
    assert mixer.next().source == "prompt_set"
