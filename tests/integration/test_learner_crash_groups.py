"""The SIGKILL test of test_learner_crash.py with a group objective (grpo), on a log where
groups interleave so the learner takes them out of poll order: its checkpoints then hold
handled offsets above their Kafka offsets, and after every kill and restart each rollout
is still trained exactly once."""

from __future__ import annotations

import pytest

from rlhf.bus import EventProducer
from rlhf.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts
from tests.integration.test_learner_crash import kill_restart_until_trained, learner_env, ledger_entries

GROUP = 2  # samples per prompt
BATCH = 4  # two groups per step
BATCHES = 12


def interleaved(groups: list[list]) -> list:
    """Per three groups L, X, Y: L's first member, X, Y, then L's second member — L finishes
    after X and Y although it started first."""
    out = []
    for k in range(0, len(groups), 3):
        lead, x, y = groups[k : k + 3]
        out += [lead[0], *x, *y, lead[1]]
    return out


@pytest.mark.slow
def test_sigkill_with_groups_taken_out_of_order_trains_every_rollout_exactly_once(
    broker, topics, tiny_model_dir, tmp_path
):
    # 1. every rollout up front: 24 groups of 2 from the base policy, interleaved
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Question {i}?"}]) for i in range(BATCH // GROUP)]
    reward = TokenSetReward(len(tok))
    groups: list[list] = []
    for b in range(BATCHES):
        rollouts = sample_rollouts(
            lm,
            lm,
            [p for p in prompts for _ in range(GROUP)],
            reward,
            policy_version=0,
            max_new_tokens=6,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            seed=b,
        )
        for r in rollouts:  # rows 2k and 2k+1 are the same prompt: one group
            r.group_id, r.group_size = f"b{b}-g{int(r.prompt_id[1:]) // GROUP}", GROUP
        groups += [rollouts[i : i + GROUP] for i in range(0, len(rollouts), GROUP)]
    produced = interleaved(groups)
    with EventProducer(broker.bootstrap) as producer:
        producer.publish_many([(topics.rollouts, r, "one-partition") for r in produced])

    state_dir = tmp_path / "state"
    env = learner_env(broker, topics, tiny_model_dir, state_dir, objective="grpo", batch_size=BATCH)
    status = kill_restart_until_trained(env, state_dir, tmp_path / "learner.log", len(produced))

    # 4. the ledger: each rollout once, none missing, every step two whole groups
    entries = ledger_entries(state_dir)
    trained = [event_id for e in entries for event_id in e["trained"]]
    assert len(trained) == len(set(trained)), "a rollout was trained twice"
    assert set(trained) == {r.event_id for r in produced}, "a rollout was skipped"
    group_of = {r.event_id: r.group_id for r in produced}
    for e in entries:
        members = [group_of[i] for i in e["trained"]]
        assert all(members.count(g) == GROUP for g in members), f"step {e['step']} split a group"
    assert [e["step"] for e in entries] == list(range(1, BATCHES + 1))
    assert status.step == BATCHES and status.rollouts_trained == len(produced)
    assert entries[-1]["offsets"] == [[topics.rollouts, 0, len(produced)]]
    # steps took groups out of poll order (a step's offsets are not one run), so checkpoints
    # held handled offsets above their Kafka offsets
    position = {r.event_id: i for i, r in enumerate(produced)}
    runs = [sorted(position[i] for i in e["trained"]) for e in entries]
    assert any(run != list(range(run[0], run[0] + BATCH)) for run in runs), "no step out of order: tests nothing"
    assert "restored checkpoint" in (tmp_path / "learner.log").read_text()
