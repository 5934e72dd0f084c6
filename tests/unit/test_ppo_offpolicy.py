"""Off-policy correction on rollouts two versions stale (rlhf/ppo/offpolicy.py in
PPOTrainer): the truncated importance weights the trainer uses equal min(π_v2/π_v0, C)
computed directly from the two policies' distributions, and without them the estimate is
biased toward the old policy.

One-token responses make the truth exact: E_π[r | x] = Σ_a π(a|x)·r(a) over the vocabulary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf.learner import PPOConfig, PPOTrainer, build_policy
from rlhf.learner.batch import collate
from rlhf.learner.policy import response_logits
from rlhf.models import build_tiny_model, chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.testing.rollouts import TokenSetReward, sample_rollouts

PROMPTS, SAMPLES = 4, 32  # a group of SAMPLES one-token responses per prompt
CAP = 2.0


def test_stale_rollouts_are_reweighted_to_the_proximal_policy(tmp_path):
    # peaked next-token distributions (like a real LM), so two small steps move the policy
    model_dir = build_tiny_model(tmp_path / "model", initializer_range=1.0)
    tok = load_tokenizer(model_dir)
    reference = load_causal_lm(model_dir)
    reward = TokenSetReward(len(tok), fraction=0.5, seed=0)  # r(a) = 1 on half of the vocabulary
    prompts = [
        chat_prompt_ids(tok, [{"role": "user", "content": f"Tell me about topic number {i}"}]) for i in range(PROMPTS)
    ]
    cfg = PPOConfig(
        objective="grpo",
        off_policy_correction="tis",
        tis_cap=CAP,
        finetune="full",
        lr=5e-5,
        batch_size=PROMPTS * SAMPLES,
        minibatch_size=PROMPTS * SAMPLES // 4,
        micro_batch_size=PROMPTS * SAMPLES // 4,
        ppo_epochs=2,
        kl_coef=0.0,
        adaptive_kl=False,
    )
    policy = build_policy(model_dir, cfg)
    trainer = PPOTrainer(policy, cfg)

    def sample(version: int, seed: int) -> list:
        rollouts = sample_rollouts(
            policy.causal_lm,
            reference,
            [p for p in prompts for _ in range(SAMPLES)],
            reward,
            version,
            max_new_tokens=1,
            pad_id=tok.pad_token_id,
            eos_id=None,
            seed=seed,
            make_event=lambda **f: SimpleNamespace(event_id="", **f),
        )
        for i, r in enumerate(rollouts):
            r.group_id, r.group_size = f"g{i // SAMPLES}", SAMPLES
        return rollouts

    @torch.no_grad()
    def next_token_probs() -> torch.Tensor:
        """(PROMPTS, V) π(a|x) of the current weights."""
        b = collate(
            [
                SimpleNamespace(
                    prompt_token_ids=p,
                    response_token_ids=[0],
                    logprobs=[0.0],
                    ref_logprobs=[0.0],
                    score=0.0,
                    policy_version=0,
                )
                for p in prompts
            ],
            tok.pad_token_id,
        )
        logits, _ = response_logits(
            policy.causal_lm, b.input_ids, b.attention_mask, b.position_ids, b.prompt_width, 1, 1.0
        )
        return torch.softmax(logits[:, 0].float(), -1)

    # 1. rollouts from version 0, held back; two steps on fresh rollouts make versions 1 and 2
    stale = collate(sample(0, seed=100), tok.pad_token_id)
    p_v0 = next_token_probs()
    for version in (0, 1):
        on_policy = trainer.step(collate(sample(version, seed=version), tok.pad_token_id))
        assert on_policy["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # fresh: π_behav = π_prox
    p_v2 = next_token_probs()

    # 2. the weights, directly: π_prox = π_v2 (the weights the step starts from), π_behav = π_v0
    row_prompt = torch.arange(PROMPTS * SAMPLES) // SAMPLES
    action = stale.response_ids[:, 0]
    ratio = p_v2[row_prompt, action] / p_v0[row_prompt, action]  # (B,) π_v2(a)/π_v0(a)
    assert torch.allclose(stale.logprobs[:, 0], p_v0[row_prompt, action].log(), atol=1e-4)  # behaviour = v0
    stats = trainer.step(stale)
    assert stats["tis_weight_mean"] == pytest.approx(float(ratio.clamp(max=CAP).mean()), rel=1e-4)
    assert stats["tis_truncated_ratio"] == pytest.approx(float((ratio > CAP).float().mean()), abs=1e-6)
    assert stats["logprob_mismatch"] == pytest.approx(float(ratio.log().abs().mean()), rel=1e-4)
    assert 0 < stats["tis_truncated_ratio"] < 0.5

    # 3. bias: E_{π_v2}[r] from the stale samples. Without correction every weight is 1 and
    # the estimate is E_{π_v0}[r]; the importance weights move it to the truth.
    preferred = reward.preferred.float()
    exact = float((p_v2 @ preferred).mean())
    exact_v0 = float((p_v0 @ preferred).mean())
    r = stale.scores
    uncorrected = float(r.mean())
    truncated = float((ratio.clamp(max=CAP) * r).mean())  # the trainer's weights (step 2)
    untruncated = float((ratio * r).mean())
    print(
        f"E_v0[r] = {exact_v0:.3f}, E_v2[r] = {exact:.3f} (exact); from v0's samples: uncorrected "
        f"{uncorrected:.3f}, TIS C={CAP:g} {truncated:.3f}, IS {untruncated:.3f}; "
        f"{stats['tis_truncated_ratio']:.1%} of tokens truncated"
    )
    assert exact - exact_v0 > 0.15  # the policy did move in two versions
    assert abs(uncorrected - exact) > 0.15  # biased toward the behaviour policy
    assert abs(untruncated - exact) < 0.1
    assert abs(truncated - exact) < abs(uncorrected - exact) - 0.1  # truncation keeps most of the correction
