"""rlhf.learner without Kafka: batching, the policy's log-probs, the PPO step, checkpoints,
the ledger, the drift gate and published versions, on the tiny random model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.learner import LearnerState, PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import collate, invalid_reason
from rlhf.learner.checkpoint import CheckpointStore, Ledger
from rlhf.learner.drift import DriftGate
from rlhf.learner.trainer import lr_lambda
from rlhf.learner.versions import load_version
from rlhf.models import load_causal_lm, sequence_logprobs
from rlhf.weightstore import WeightStore

PAD = 2


def rollout(i: int, prompt_len: int, response_len: int, score: float = 0.0, version: int = 0):
    g = torch.Generator().manual_seed(i)
    return SimpleNamespace(
        event_id=f"r{i}",
        prompt_token_ids=torch.randint(3, 1000, (prompt_len,), generator=g).tolist(),
        response_token_ids=torch.randint(3, 1000, (response_len,), generator=g).tolist(),
        logprobs=(-torch.rand(response_len, generator=g) * 8).tolist(),
        ref_logprobs=(-torch.rand(response_len, generator=g) * 8).tolist(),
        score=score,
        policy_version=version,
    )


def rollouts(n: int = 8):
    return [rollout(i, 3 + i % 4, 2 + (3 * i) % 5, score=float(i % 2)) for i in range(n)]


def small_config(**kw) -> PPOConfig:
    base = dict(batch_size=8, minibatch_size=4, micro_batch_size=4, ppo_epochs=2, lr=1e-3, finetune="full")
    return PPOConfig(**(base | kw))


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


# --- batches ----------------------------------------------------------------------------


def test_collate_left_pads_prompts_and_right_pads_responses():
    a, b = rollout(0, 2, 3), rollout(1, 4, 1)
    batch = collate([a, b], PAD)
    assert batch.prompt_width == 4 and batch.response_width == 3
    assert batch.input_ids[0].tolist() == [PAD, PAD, *a.prompt_token_ids, *a.response_token_ids]
    assert batch.input_ids[1].tolist() == [*b.prompt_token_ids, *b.response_token_ids, PAD, PAD]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert batch.position_ids[0].tolist()[2:] == [0, 1, 2, 3, 4]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.allclose(batch.logprobs[0], torch.tensor(a.logprobs))
    assert batch.logprobs[1, 1:].eq(0).all()
    assert batch.num_tokens == 10


def test_select_cuts_columns_that_are_padding_in_every_row():
    batch = collate([rollout(0, 2, 1), rollout(1, 6, 5), rollout(2, 3, 2)], PAD)
    sub = batch.select(torch.tensor([0, 2]))
    assert sub.prompt_width == 3 and sub.response_width == 2
    assert sub.input_ids.shape == (2, 5)
    assert sub.attention_mask.sum().item() == 3 + 5


def test_invalid_rollouts_are_named():
    good = rollout(0, 2, 3)
    assert invalid_reason(good) is None
    assert "response_token_ids is empty" in str(
        invalid_reason(SimpleNamespace(**{**vars(good), "response_token_ids": [], "logprobs": [], "ref_logprobs": []}))
    )
    assert "logprobs" in str(invalid_reason(SimpleNamespace(**{**vars(good), "logprobs": [0.0]})))
    with pytest.raises(ValueError, match="r0"):
        collate([SimpleNamespace(**{**vars(good), "prompt_token_ids": []})], PAD)


# --- the policy -------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_policy_logprobs_match_a_plain_forward(tiny_model_dir, finetune):
    policy = build_policy(tiny_model_dir, small_config(finetune=finetune))
    reference = load_causal_lm(tiny_model_dir)
    batch = collate(rollouts(4), PAD)
    logits, values = policy(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width, batch.response_width
    )
    assert logits.shape[:2] == values.shape == batch.response_mask.shape
    from rlhf.ppo import logprobs_from_logits

    ours = logprobs_from_logits(logits, batch.response_ids)
    for i, r in enumerate(rollouts(4)):
        truth = sequence_logprobs(reference, r.prompt_token_ids, r.response_token_ids)
        assert torch.allclose(ours[i, : len(truth)], truth, atol=1e-4)


def test_lora_trains_only_the_adapter_and_the_value_head(tiny_model_dir):
    policy = build_policy(tiny_model_dir, small_config(finetune="lora"))
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    assert all(".lora_" in k for k in policy.policy_state_dict())


# --- the PPO step -----------------------------------------------------------------------


def test_step_reports_every_metric_and_changes_the_policy(tiny_model_dir):
    policy = build_policy(tiny_model_dir, small_config())
    trainer = PPOTrainer(policy, small_config())
    before = params(policy)
    stats = trainer.step(collate(rollouts(), PAD))
    for key in (
        "kl",
        "kl_coef",
        "reward_mean",
        "score_mean",
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "response_length",
        "tokens_per_second",
        "policy_loss",
        "grad_norm",
    ):
        assert key in stats and isinstance(stats[key], float), key
    assert stats["score_mean"] == 0.5
    assert 0 < stats["entropy"] <= math.log(policy.causal_lm.config.vocab_size) + 1e-3
    after = params(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.steps == 1


def test_first_minibatch_starts_on_policy_when_recomputing(tiny_model_dir):
    cfg = small_config(ppo_epochs=1, minibatch_size=8, micro_batch_size=8)
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    stats = trainer.step(collate(rollouts(), PAD))
    # one minibatch, one optimizer step: the loss was taken at ρ = 1 exactly
    assert stats["clipfrac"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-6 and abs(stats["ratio_mean"] - 1) < 1e-6


def test_a_non_finite_padded_slot_stays_out_of_the_behaviour_pass(tiny_model_dir):
    cfg = small_config()
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    batch = collate(rollouts(), PAD)
    forward = trainer._forward

    def poisoned(mb):  # what a padded position may hold in fp16: inf logits, a NaN value
        logits, values = forward(mb)
        pad = ~mb.response_mask.bool()  # (b, R)
        return logits.masked_fill(pad.unsqueeze(-1), float("inf")), values.masked_fill(pad, float("nan"))

    trainer._forward = poisoned
    mask = batch.response_mask.bool()
    for out in trainer._behaviour_pass(batch):  # log π, V, entropy: each (B, R)
        assert torch.isfinite(out).all() and not out[~mask].any()


def test_micro_batches_accumulate_to_the_minibatch_gradient(tiny_model_dir):
    results = []
    for micro in (4, 2, 1):
        # adam_eps ≫ |g|: the update is ≈ lr·g, so float noise in a ~0 gradient cannot flip
        # its sign the way Adam's first step (lr·g/|g|) would
        cfg = small_config(micro_batch_size=micro, ppo_epochs=1, adam_eps=1.0, lr=0.1)
        policy = build_policy(tiny_model_dir, cfg)
        PPOTrainer(policy, cfg).step(collate(rollouts(), PAD))
        results.append(params(policy))
    for other in results[1:]:
        for k in results[0]:
            assert torch.allclose(results[0][k], other[k], atol=1e-7), k


def test_adaptive_beta_rises_when_kl_exceeds_target(tiny_model_dir):
    cfg = small_config(kl_target=1e-3, kl_horizon=100, old_logprobs="rollout")
    trainer = PPOTrainer(build_policy(tiny_model_dir, cfg), cfg)
    batch = collate(rollouts(), PAD)
    batch.ref_logprobs = batch.logprobs - 1.0 * batch.response_mask  # KL = response length > target
    stats = trainer.step(batch)
    assert stats["kl"] > 1e-3
    assert stats["kl_coef_next"] == pytest.approx(cfg.kl_coef * (1 + 0.2 * 8 / 100))


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(PPOConfig(lr_schedule="linear", warmup_steps=4, decay_steps=10, min_lr_ratio=0.1))
    assert [round(f(n), 3) for n in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    cosine = lr_lambda(PPOConfig(lr_schedule="cosine", decay_steps=10, min_lr_ratio=0.0))
    assert cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert lr_lambda(PPOConfig())(1000) == 1.0


def test_batch_sizes_must_nest():
    with pytest.raises(ValueError, match="multiple"):
        PPOTrainer(SimpleNamespace(device=torch.device("cpu")), PPOConfig(batch_size=8, minibatch_size=3))


# --- checkpoints and the ledger ---------------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resuming_from_a_checkpoint_continues_exactly(tiny_model_dir, tmp_path, finetune):
    cfg = small_config(finetune=finetune)
    first, second = collate(rollouts(), PAD), collate(list(reversed(rollouts())), PAD)

    straight = build_policy(tiny_model_dir, cfg)
    trainer = PPOTrainer(straight, cfg)
    trainer.step(first)
    expected = trainer.step(second)

    store = CheckpointStore(tmp_path / "ckpt")
    interrupted = build_policy(tiny_model_dir, cfg)
    trainer = PPOTrainer(interrupted, cfg)
    trainer.step(first)
    folder = store.save(1, interrupted, trainer, {"state": {"step": 1}})
    del interrupted, trainer

    resumed = build_policy(tiny_model_dir, cfg)
    trainer = PPOTrainer(resumed, cfg)
    meta = CheckpointStore.load(folder, resumed, trainer)
    assert meta["step"] == 1 and trainer.steps == 1
    got = trainer.step(second)
    assert got["kl_coef"] == expected["kl_coef"]
    for key in ("policy_loss", "value_loss", "clipfrac", "kl"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    want = params(straight)
    for k, v in params(resumed).items():
        assert torch.allclose(v, want[k], atol=1e-6), k


def test_checkpoint_store_keeps_the_newest_and_clears_interrupted_writes(tiny_model_dir, tmp_path):
    cfg = small_config()
    policy = build_policy(tiny_model_dir, cfg)
    trainer = PPOTrainer(policy, cfg)
    root = tmp_path / "ckpt"
    store = CheckpointStore(root, keep=2)
    for step in range(3):
        store.save(step, policy, trainer, {})
    assert [f.name for f in store.folders()] == ["ckpt-00000002", "ckpt-00000003"]
    (root / ".tmp-ckpt-00000004-x").mkdir()  # SIGKILL mid-write
    assert CheckpointStore(root).latest().name == "ckpt-00000003"
    assert not list(root.glob(".tmp-*"))


def test_ledger_cuts_back_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for step in (1, 2, 3):
        ledger.append({"step": step, "trained": [f"e{step}"]})
    with open(ledger.path, "a") as f:
        f.write('{"step": 4, "trai')  # killed mid-write
    assert [e["step"] for e in ledger.entries()] == [1, 2, 3]
    assert ledger.truncate_after(2) == 1
    ledger.append({"step": 3, "trained": ["again"]})
    assert [e["trained"] for e in ledger.entries()] == [["e1"], ["e2"], ["again"]]
    assert all(json.loads(line) for line in ledger.path.read_text().splitlines())


def test_learner_state_lag_follows_the_lineage():
    state = LearnerState(lineage=[0, 1, 2, 5])
    assert state.lag(5) == 0 and state.lag(2) == 1 and state.lag(0) == 3
    assert state.lag(3) is None  # a rejected branch: not an ancestor of these weights
    again = LearnerState.from_json(json.loads(json.dumps(LearnerState(offsets={("t", 0): 7}).to_json())))
    assert again.offsets == {("t", 0): 7}


# --- drift gate and published versions --------------------------------------------------


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_drift_gate_is_zero_at_the_reference_and_refuses_a_drifted_policy(tiny_model_dir, finetune):
    cfg = small_config(finetune=finetune, lr=0.05, ppo_epochs=4)
    policy = build_policy(tiny_model_dir, cfg)
    gate = DriftGate([[1, 2, 3, 4], [5, 6, 7]], budget=0.01, pad_id=PAD, eos_id=None, max_new_tokens=6)
    assert gate.measure(policy) == pytest.approx(0.0, abs=1e-5)
    assert gate.measure(policy) == gate.measure(policy)  # fixed seed: same samples
    PPOTrainer(policy, cfg).step(collate(rollouts(), PAD))
    result = gate.check(policy)
    assert result.kl > 0.01 and not result.passed and "exceeds budget" in result.reason
    assert DriftGate([[1, 2, 3]], budget=1e9, pad_id=PAD, eos_id=None).check(policy).passed


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_published_version_loads_back_to_the_same_policy(tiny_model_dir, tmp_path, finetune):
    cfg = small_config(finetune=finetune, lr=0.01)
    policy = build_policy(tiny_model_dir, cfg)
    PPOTrainer(policy, cfg).step(collate(rollouts(), PAD))
    store = WeightStore(tmp_path / "weights")
    record = store.put(1, policy.policy_state_dict(), fmt=finetune, adapter_config=policy.adapter_config())
    loaded = load_version(store, 1, tiny_model_dir, expected_sha256=record.sha256)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, policy.causal_lm(ids).logits, atol=1e-4)
        assert not torch.allclose(load_causal_lm(tiny_model_dir)(ids).logits, loaded(ids).logits, atol=1e-4)
