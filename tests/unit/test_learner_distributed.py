"""The learner on 2 gloo ranks takes the same PPO step as on 1 (rlhf/learner/distributed.py).

Each case spawns two CPU processes (torch.multiprocessing) that join a gloo process group the
way torchrun describes one (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): rank 0 calls
`PPOTrainer.step` on a fixed batch, rank 1 follows it (`PPOTrainer.follow`), and both end
with the same weights as one process stepping alone on the same batch.

Tolerance: max |θ_2 ranks − θ_1 rank| ≤ 1e-6 (fp32, lr 0.1, adam_eps 1: Adam's update is then
≈ lr·g, so the float noise of summing the gradient in another order cannot flip the sign of a
~0 component the way Adam's first step lr·g/|g| would; see test_learner.py's micro-batch
test). The two ranks' replicas are bit-identical: they take the same optimizer step.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from rlhf.learner import PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import collate
from rlhf.learner.distributed import Ranks
from rlhf.learner.feedback import ANSWER, PAIR, FeedbackExample
from rlhf.learner.feedback_loss import collate_feedback
from tests.procs import free_port

PAD = 2
TOLERANCE = 1e-6  # max abs parameter difference, fp32


def rollout(i: int, group: int):
    g = torch.Generator().manual_seed(i)
    prompt_len, response_len = 3 + i % 4, 2 + (3 * i) % 5
    return SimpleNamespace(
        event_id=f"r{i}",
        group_id=f"g{group}",
        prompt_token_ids=torch.randint(3, 1000, (prompt_len,), generator=g).tolist(),
        response_token_ids=torch.randint(3, 1000, (response_len,), generator=g).tolist(),
        logprobs=(-torch.rand(response_len, generator=g) * 8).tolist(),
        ref_logprobs=(-torch.rand(response_len, generator=g) * 8).tolist(),
        score=float((i * 7) % 5) / 2,
        policy_version=0,
    )


def batch():
    # 12 rollouts in 3 groups of 4; minibatches of 6 split 3 + 3, micro-batches of 2 (2 + 1
    # on each rank: uneven pieces, the case DDP's reducer does not take)
    return collate([rollout(i, i // 4) for i in range(12)], PAD)


def feedback():
    def ids(i, n):
        return tuple(range(10 + i, 10 + i + n))

    examples = [FeedbackExample(PAIR, f"p{i}", ids(i, 4), ids(i + 50, 3), ids(i + 90, 2)) for i in range(3)]
    examples += [FeedbackExample(ANSWER, f"a{i}", ids(i + 7, 3), ids(i + 30, 4)) for i in range(3)]
    return collate_feedback(examples, PAD)


def config(**kw) -> PPOConfig:
    base = dict(
        batch_size=12,
        minibatch_size=6,
        micro_batch_size=2,
        ppo_epochs=2,
        lr=0.1,
        adam_eps=1.0,
        finetune="full",
    )
    return PPOConfig(**(base | kw))


def trained(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}


def one_rank(model_dir, cfg_kw: dict, with_feedback: bool):
    cfg = config(**cfg_kw)
    policy = build_policy(model_dir, cfg)
    stats = PPOTrainer(policy, cfg).step(batch(), feedback() if with_feedback else None)
    return trained(policy), stats


CASES = {
    "ppo": dict(objective="ppo"),
    "grpo_kl_loss": dict(objective="grpo", kl_in="loss"),
    "online_dpo": dict(objective="online_dpo"),
    "rloo_distill_feedback": dict(objective="rloo", distill="best_of_n", user_feedback="both"),
}


def with_feedback(cfg_kw: dict) -> bool:
    return cfg_kw.get("user_feedback", "none") != "none"


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str):
    """One rank: every case in turn, over one process group (one spawn: imports are slow)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ranks = Ranks.from_env(torch.device("cpu"), timeout_seconds=120)
    ranks_close, ranks.close = ranks.close, lambda: None  # one group for every case
    results = {}
    for case, cfg_kw in CASES.items():
        cfg = config(**cfg_kw)
        policy = build_policy(model_dir, cfg)
        trainer = PPOTrainer(policy, cfg, ranks)
        result = {}
        if ranks.leader:
            trainer.share_state()  # what the learner does after its restore
            result["stats"] = trainer.step(batch(), feedback() if with_feedback(cfg_kw) else None)
            trainer.release()
        else:
            trainer.follow()
        result["params"] = trained(policy)
        result["steps"] = trainer.steps
        results[case] = result
    ranks_close()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(2, free_port(), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_ranks_take_the_one_rank_step(tiny_model_dir, two_ranks, case):
    cfg_kw = CASES[case]
    torch.set_num_threads(1)
    before = trained(build_policy(tiny_model_dir, config(**cfg_kw)))
    expected, stats_1 = one_rank(tiny_model_dir, cfg_kw, with_feedback(cfg_kw))
    rank0, rank1 = two_ranks[0][case], two_ranks[1][case]

    assert rank0["steps"] == rank1["steps"] == 1
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the step changed nothing: the comparison would be empty"
    worst = max((rank0["params"][k] - expected[k]).abs().max().item() for k in expected)
    print(f"{case}: max |2 ranks - 1 rank| = {worst:.3g} (the step moved weights by up to {moved:.3g})")
    assert worst <= TOLERANCE, f"2 ranks differ from 1 by {worst:.3g} (tolerance {TOLERANCE})"
    for k in expected:  # the replicas took the same optimizer step
        assert torch.equal(rank0["params"][k], rank1["params"][k]), k
    for key in ("policy_loss", "kl", "grad_norm", "entropy", "dpo_loss", "distill_loss", "user_distill_loss"):
        if key in stats_1:
            assert rank0["stats"][key] == pytest.approx(stats_1[key], rel=1e-4, abs=1e-6), key


def test_one_process_is_world_size_one_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Ranks.from_env(torch.device("cpu"))
    assert (ranks.rank, ranks.world_size, ranks.distributed, ranks.leader) == (0, 1, False, True)
    rows = torch.arange(5)
    assert torch.equal(ranks.shard(rows), rows)
    assert Ranks(rank=1, world_size=2).shard(rows).tolist() == [3, 4]
    assert Ranks(rank=0, world_size=2).shard(rows).tolist() == [0, 1, 2]
