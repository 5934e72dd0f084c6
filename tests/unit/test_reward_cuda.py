"""The reward and reference models on a GPU: the same numbers as on CPU (to float
tolerance), training works there, and checkpoints move between devices.

Needs CUDA, which this project's CI machines do not have: every test here is skipped
without a GPU (a GPU cannot be mocked). Run on a GPU machine with tiny models prepared:
    pytest --noconftest tests/unit/test_reward_cuda.py
"""

from __future__ import annotations

import pytest
import torch

from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, messages_of, resolve_backbone
from rlhf.reward.checkpoint import RewardCheckpoints
from rlhf.testing.preferences import SyntheticPreference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def backbone():
    return resolve_backbone("tiny")  # built once under RLHF_HOME


def test_rm_scores_match_cpu_and_training_and_checkpoints_work_on_cuda(backbone, tmp_path):
    gen, held = SyntheticPreference(seed=1), SyntheticPreference(seed=2)
    test_pairs = [held.pair() for _ in range(100)]
    prompts = [messages_of(p) for p, _, _ in test_pairs]
    cpu = load_reward_model(backbone, max_tokens=64)
    gpu = load_reward_model(backbone, max_tokens=64, device="cuda")
    assert gpu.head.weight.is_cuda
    texts = [c for _, c, _ in test_pairs]
    assert torch.allclose(cpu.score(prompts, texts), gpu.score(prompts, texts), atol=1e-4)

    torch.manual_seed(0)
    trainer = OnlineRewardTrainer(gpu, TrainerConfig(lr=1e-3, train_batch_size=16, accuracy_window=64))
    list(trainer.train(trainer.ingest([gen.comparison_event() for _ in range(320)]).examples))
    chosen = gpu.score(prompts, [c for _, c, _ in test_pairs])
    rejected = gpu.score(prompts, [r for _, _, r in test_pairs])
    assert (chosen > rejected).float().mean().item() > 0.9
    assert trainer.online_accuracy > 0.8

    ckpt = RewardCheckpoints(tmp_path)
    record = ckpt.publish(gpu.state_dict(), parent=0, base_model="tiny", meta={})
    ckpt.save_state(trainer.step, record.version, {"trainer": trainer.state_dict(), "offsets": []})
    state = ckpt.latest_state()
    _, tensors = ckpt.load_weights(state["version"])
    cpu.load_state_dict(tensors)
    assert torch.allclose(cpu.score(prompts, texts), gpu.score(prompts, texts), atol=1e-4)
    resumed = OnlineRewardTrainer(load_reward_model(backbone, max_tokens=64, device="cuda"), TrainerConfig(lr=1e-3))
    resumed.model.load_state_dict(tensors)
    resumed.load_state_dict(state["trainer"])
    assert resumed.step == trainer.step and len(resumed.buffer) == 320
    list(resumed.train(resumed.ingest([gen.comparison_event() for _ in range(16)]).examples))  # optimiser state on cuda


def test_reference_log_probs_match_cpu(tmp_path):
    from rlhf.models import build_tiny_model, sequence_logprobs
    from rlhf.reference import ReferenceModel

    folder = build_tiny_model(tmp_path / "tiny")
    cpu, gpu = ReferenceModel(folder), ReferenceModel(folder, device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    responses = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (8, 3, 20, 11)]
    for batching in ("exact", "padded"):
        gpu.batching = batching
        for a, b, _p, r in zip(cpu.logprobs(prompts, responses), gpu.logprobs(prompts, responses), prompts, responses):
            assert b.device.type == "cpu" and b.shape == (len(r),)
            assert torch.allclose(a, b, atol=1e-4)
    # exact batching on the GPU is bitwise the GPU's own one-by-one forward
    gpu.batching = "exact"
    for b, p, r in zip(gpu.logprobs(prompts, responses), prompts, responses):
        assert torch.equal(b, sequence_logprobs(gpu.model, p, r))
