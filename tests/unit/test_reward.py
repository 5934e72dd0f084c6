"""rlhf.reward: losses on hand-computed cases, normaliser, feedback conversion, de-dup,
replay, the trainer learning a synthetic preference, checkpoints round-tripping."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.reward import (
    PAIR,
    POINT,
    EventDedup,
    Example,
    FeedbackConverter,
    OnlineRewardTrainer,
    ReplayBuffer,
    ScoreNormalizer,
    TrainerConfig,
    bradley_terry_loss,
    load_reward_model,
    messages_of,
    pointwise_logistic_loss,
    resolve_backbone,
)
from rlhf.reward.checkpoint import RewardCheckpoints
from rlhf.testing.preferences import KEYWORD, SyntheticPreference
from rlhf.v1 import common_pb2, events_pb2


def feedback(event_id: str, prompt: str = "hi", **kind) -> events_pb2.Feedback:
    return events_pb2.Feedback(
        schema_version=1, event_id=event_id, prompt=[common_pb2.ChatMessage(role="user", content=prompt)], **kind
    )


def rating(event_id: str, response: str, value: int, prompt: str = "hi") -> events_pb2.Feedback:
    return feedback(event_id, prompt, rating=events_pb2.Rating(response=response, value=value))


def comparison(event_id: str, chosen: str, rejected: str, prompt: str = "hi") -> events_pb2.Feedback:
    return feedback(event_id, prompt, comparison=events_pb2.Comparison(chosen=chosen, rejected=rejected))


# ---- losses -----------------------------------------------------------------------------


def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    # −log σ(2), −log σ(0), −log σ(−2)
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["bt_accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["bt_margin"].item() == pytest.approx(0.0)


def test_bradley_terry_loss_is_stable_and_shift_invariant():
    chosen, rejected = torch.tensor([1000.0, -1000.0]), torch.tensor([-1000.0, 1000.0])
    loss, _ = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0)  # (0 + 2000) / 2
    a, _ = bradley_terry_loss(torch.tensor([0.3, 1.2]), torch.tensor([0.1, 2.0]))
    b, _ = bradley_terry_loss(torch.tensor([5.3, 6.2]), torch.tensor([5.1, 7.0]))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_pointwise_logistic_loss_hand_computed():
    loss, stats = pointwise_logistic_loss(torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, rel=1e-6)
    assert stats["point_accuracy"].item() == pytest.approx(0.5)


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        pointwise_logistic_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# ---- normaliser ---------------------------------------------------------------------------


def test_normalizer_matches_batch_statistics_and_clips():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, generator=g) * 3 + 7
    n = ScoreNormalizer(window=1e9, clip=2.0)
    for chunk in data.split(37):
        n.update(chunk)
    assert n.mean == pytest.approx(data.mean().item(), rel=1e-6)
    assert n.std == pytest.approx(data.std(unbiased=False).item(), rel=1e-6)
    out = n.normalize(torch.tensor([7.0, 1000.0, -1000.0]))
    assert out[1].item() == 2.0 and out[2].item() == -2.0 and abs(out[0].item()) < 0.05


def test_normalizer_forgets_beyond_its_window():
    n = ScoreNormalizer(window=100)
    for _ in range(50):
        n.update(torch.zeros(100))
    for _ in range(50):
        n.update(torch.full((100,), 10.0))
    assert n.mean > 9.9  # the zeros have faded out
    assert ScoreNormalizer.from_state(n.state_dict()) == n


def test_normalizer_identity_before_first_score():
    assert torch.equal(ScoreNormalizer(clip=5).normalize(torch.tensor([1.5, 9.0])), torch.tensor([1.5, 5.0]))


# ---- feedback → examples, de-dup, replay --------------------------------------------------


def test_comparison_becomes_a_pair_and_bad_ones_are_reported():
    c = FeedbackConverter()
    kind, ex, problem = c.convert(comparison("e1", "good", "bad"))
    assert (kind, problem) == ("comparison", None)
    assert ex == [Example(PAIR, (("user", "hi"),), chosen="good", rejected="bad", event_id="e1")]
    assert c.convert(comparison("e2", "same", "same"))[2].reason == "identical_responses"
    assert c.convert(rating("e3", "x", 0))[2].reason == "rating_out_of_range"
    kind, ex, problem = c.convert(feedback("e4"))
    assert (kind, ex, problem.reason) == ("unknown", [], "no_rating_or_comparison")


def test_thumbs_pair_with_an_opposite_rating_of_the_same_prompt_else_pointwise():
    c = FeedbackConverter()
    first = c.convert(rating("e1", "meh answer", -1))[1][0]
    assert (first.kind, first.label) == (POINT, -1)
    same_sign = c.convert(rating("e2", "also meh", -1))[1][0]
    assert same_sign.kind == POINT
    other_prompt = c.convert(rating("e3", "great", 1, prompt="other"))[1][0]
    assert other_prompt.kind == POINT  # nothing rated for that prompt yet
    paired = c.convert(rating("e4", "great answer", 1))[1][0]
    # pairs with the most recent opposite rating of the same prompt
    assert (paired.kind, paired.chosen, paired.rejected, paired.event_id) == (PAIR, "great answer", "also meh", "e4")
    down = c.convert(rating("e5", "bad", -1))[1][0]
    assert (down.chosen, down.rejected) == ("great answer", "bad")
    # the pairing memory survives a checkpoint
    c2 = FeedbackConverter()
    c2.load_state(c.state())
    assert c2.convert(rating("e6", "fine", 1))[1][0].rejected == "bad"


def test_same_response_rated_both_ways_is_not_a_pair():
    c = FeedbackConverter()
    c.convert(rating("e1", "answer", 1))
    assert c.convert(rating("e2", "answer", -1))[1][0].kind == POINT


def test_dedup_remembers_a_bounded_window():
    d = EventDedup(capacity=3)
    assert d.add("a") and d.add("b") and not d.add("a")
    d.add("c"), d.add("d")
    assert "a" not in d and len(d) == 3
    assert EventDedup(3, d.state()).state() == ["b", "c", "d"]


def test_replay_buffer_bounded_sampling_and_state():
    b = ReplayBuffer(capacity=5, seed=1)
    b.extend(Example(POINT, (), response=str(i), label=1, event_id=str(i)) for i in range(8))
    assert len(b) == 5
    sample = b.sample(3)
    assert len(sample) == 3 and len(set(sample)) == 3 and all(int(e.response) >= 3 for e in sample)
    assert b.sample(100) and len(b.sample(100)) == 5
    c = ReplayBuffer(5)
    c.load_state(b.state())
    assert [e.response for e in c._items] == ["3", "4", "5", "6", "7"]


# ---- the model and trainer (tiny backbone) ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return resolve_backbone("tiny", cache_dir=tmp_path_factory.mktemp("rm"))


def test_reward_model_scores_are_batch_independent(tiny_backbone):
    model = load_reward_model(tiny_backbone, max_tokens=32)
    prompts = [(("user", "hello"),), (("user", "a much longer question " * 20),)]
    responses = ["short", "a long answer " * 30]
    batch = model.score(prompts, responses)
    one = torch.cat([model.score(prompts[i : i + 1], responses[i : i + 1]) for i in range(2)])
    assert batch.shape == (2,) and torch.allclose(batch, one, atol=1e-5)
    # truncation keeps every item within max_tokens
    assert model.encode(prompts, responses)["input_ids"].shape[1] == 32
    # the same seed gives the same fresh head
    again = load_reward_model(tiny_backbone, max_tokens=32)
    assert torch.equal(again.score(prompts, responses), batch)


def test_trainer_learns_synthetic_preference_with_progressive_validation(tiny_backbone):
    torch.manual_seed(0)
    model = load_reward_model(tiny_backbone, max_tokens=64)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=1e-3, train_batch_size=16, accuracy_window=64))
    gen, held = SyntheticPreference(seed=1), SyntheticPreference(seed=2)
    test_pairs = [held.pair() for _ in range(100)]

    def held_out_accuracy() -> float:
        prompts = [messages_of(p) for p, _, _ in test_pairs]
        chosen = model.score(prompts, [c for _, c, _ in test_pairs])
        rejected = model.score(prompts, [r for _, _, r in test_pairs])
        return (chosen > rejected).float().mean().item()

    before = held_out_accuracy()
    ingested = trainer.ingest([gen.comparison_event() for _ in range(320)])
    assert len(ingested.examples) == 320 and ingested.kinds == {"comparison": 320}
    stats = list(trainer.train(ingested.examples))
    assert len(stats) == trainer.step == 20 and trainer.pairs_seen == 320
    assert stats[0]["replayed"] == 0 and stats[-1]["replayed"] == 16
    # progressive validation: early batches are judged at chance, late ones after learning
    assert stats[0]["validation_accuracy"] < 0.8 <= trainer.online_accuracy
    assert held_out_accuracy() > 0.9 > before
    assert trainer.normalizer.count > 0 and KEYWORD == "please"


def test_trainer_ingest_drops_duplicates_and_mixes_kinds(tiny_backbone):
    model = load_reward_model(tiny_backbone, max_tokens=32)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=1e-3, train_batch_size=4))
    events = [comparison("c1", "a please", "b"), rating("r1", "x", 1), rating("r2", "y", -1), rating("r3", "z", 0)]
    first = trainer.ingest(events)
    assert [e.kind for e in first.examples] == [PAIR, POINT, PAIR]
    assert first.invalid == {"rating_out_of_range": 1} and first.kinds == {"comparison": 1, "thumbs": 3}
    assert [(i, why.split(":")[0]) for i, why in first.refused] == [(3, "rating_out_of_range")]
    again = trainer.ingest(events)
    assert again.examples == [] and again.duplicates == 4
    (s,) = list(trainer.train(first.examples))
    assert s["new_pairs"] == 2 and s["new_examples"] == 3
    assert {"bt_loss", "point_loss", "loss", "grad_norm"} <= set(s)


def test_checkpoint_round_trip_restores_everything(tiny_backbone, tmp_path):
    model = load_reward_model(tiny_backbone, max_tokens=32)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=1e-3, train_batch_size=8))
    gen = SyntheticPreference(seed=3)
    list(trainer.train(trainer.ingest([gen.comparison_event() for _ in range(24)]).examples))
    ckpt = RewardCheckpoints(tmp_path, keep_versions=2, keep_states=2)
    record = ckpt.publish(model.state_dict(), parent=0, base_model="tiny", meta={"train_step": trainer.step})
    ckpt.save_state(trainer.step, record.version, {"trainer": trainer.state_dict(), "offsets": [["t", 0, 24]]})

    fresh = OnlineRewardTrainer(
        load_reward_model(tiny_backbone, max_tokens=32), TrainerConfig(lr=1e-3, train_batch_size=8)
    )
    state = ckpt.latest_state()
    _, tensors = ckpt.load_weights(state["version"])
    fresh.model.load_state_dict(tensors)
    fresh.load_state_dict(state["trainer"])
    assert (fresh.step, fresh.pairs_seen, state["offsets"]) == (3, 24, [["t", 0, 24]])
    assert fresh.dedup.state() == trainer.dedup.state() and len(fresh.buffer) == 24
    assert fresh.normalizer == trainer.normalizer and list(fresh.correct) == list(trainer.correct)
    prompts, texts = [(("user", "q"),)] * 2, ["one please", "two"]
    assert torch.equal(fresh.model.score(prompts, texts), model.score(prompts, texts))
    # the optimiser continues exactly: one more identical step gives identical weights
    batch = trainer.ingest([gen.comparison_event() for _ in range(8)]).examples
    fresh.ingest([])
    for t in (trainer, fresh):  # same replay sample, same dropout masks
        t.buffer._rng.seed(5)
        torch.manual_seed(5)
        list(t.train(batch))
    assert torch.equal(fresh.model.score(prompts, texts), model.score(prompts, texts))


def test_checkpoints_never_reuse_versions_and_prune(tiny_backbone, tmp_path):
    ckpt = RewardCheckpoints(tmp_path, keep_versions=2, keep_states=1)
    t = {"w": torch.zeros(2)}
    for step in (1, 2, 3):
        v = ckpt.publish(t, parent=0, base_model="x", meta={}).version
        ckpt.save_state(step, v, {})
    orphan = ckpt.publish(t, parent=3, base_model="x", meta={}).version  # crashed before its state
    assert orphan == 4 and ckpt.latest_state()["version"] == 3
    assert ckpt.next_version() == 5
    ckpt.save_state(5, ckpt.publish(t, parent=3, base_model="x", meta={}).version, {})
    assert [r.version for r in ckpt.store.versions()] == [4, 5]
    assert len(list(ckpt.states.glob("state-*.pt"))) == 1


def test_policy_backbone_reads_the_last_response_token(tiny_model_dir):
    spec = resolve_backbone("policy", policy_model=str(tiny_model_dir))
    assert spec.family == "decoder"
    model = load_reward_model(spec, max_tokens=48)
    prompts = [(("user", "hi"),), (("user", "a long question " * 30),)]
    responses = ["hello there", "an answer"]
    enc = model.encode(prompts, responses)
    eos = model.tokenizer.eos_token_id
    lengths = enc["attention_mask"].sum(1).tolist()
    # right-padded, left-truncated to 48 tokens, each ending with the end-of-turn token
    assert lengths[1] == 48 and [enc["input_ids"][i, n - 1].item() for i, n in enumerate(lengths)] == [eos, eos]
    batch = model.score(prompts, responses)
    one = torch.cat([model.score(prompts[i : i + 1], responses[i : i + 1]) for i in range(2)])
    assert torch.allclose(batch, one, atol=1e-5)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=1e-3, train_batch_size=2))
    (s,) = list(trainer.train([Example(PAIR, prompts[0], chosen="good please", rejected="bad")]))
    assert math.isfinite(s["loss"])


def test_a_store_moved_away_from_its_states_is_refused_naming_both(tmp_path):
    """States whose versions are all missing mean RLHF_REWARD_STORE moved: not a fresh start."""
    t = {"w": torch.zeros(2)}
    ckpt = RewardCheckpoints(tmp_path / "reward", versions=tmp_path / "shared" / "reward")
    ckpt.save_state(1, ckpt.publish(t, parent=0, base_model="x", meta={}).version, {})
    assert ckpt.latest_state()["version"] == 1 and (tmp_path / "shared" / "reward" / "v000001").is_dir()
    moved = RewardCheckpoints(tmp_path / "reward")  # back to the default <root>/versions: empty
    with pytest.raises(FileNotFoundError, match=r"name RM versions \[1\].*RLHF_REWARD_STORE"):
        moved.latest_state()
    assert RewardCheckpoints(tmp_path / "elsewhere").latest_state() is None  # no states: a fresh start
    # the upgrade path: the trainer copies the old store's versions into an empty new one
    target = RewardCheckpoints(tmp_path / "reward", versions=tmp_path / "new")
    assert target.adopt(tmp_path / "shared" / "reward") == [1]
    assert target.adopt(tmp_path / "shared" / "reward") == []  # once: the new store holds versions now
    assert target.latest_state()["version"] == 1 and target.load_weights(1)[1]["w"].shape == (2,)
