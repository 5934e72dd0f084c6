"""Controlled pairs (rlhf.experiments.probes) and the ODIN length-disentangled reward: each
pair differs only in what it claims; the ODIN terms equal a direct computation; the
trainer with length_debias="odin" trains both heads and serves the quality head."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf.experiments.oracles import prefers_keyword, prefers_question_ending, words
from rlhf.experiments.probes import (
    build_probes,
    count_words,
    ends_with_question,
    has_keyword,
    keyword_pair,
    length_pair,
    probe_report,
    question_pair,
)
from rlhf.reward import OnlineRewardTrainer, TrainerConfig, load_reward_model, resolve_backbone
from rlhf.reward.loss import odin_disentangle_loss, pearson

ANSWERS = [
    "Tea is easy. Boil water and steep the leaves for three minutes. Enjoy it hot!",
    "A river is flowing water. Would you like to know more?",
    "Please be careful near mountains. They are tall and cold. Bring a coat, please.",
    "Gravity pulls things together",
]
PROMPTS = ["How do I make tea?", "What is a river?", "Tell me about mountains.", "Explain gravity."]


def test_question_pairs_differ_only_in_the_end_mark():
    for a in ANSWERS:
        q = question_pair("p", a)
        assert words(q.better) == words(q.worse)  # the same words, so the same length
        assert ends_with_question(q.better) and not ends_with_question(q.worse)
        # the oracle prefers the side with the property, and only because of it
        assert prefers_question_ending("p", q.better) - prefers_question_ending("p", q.worse) == pytest.approx(1.0)
    assert question_pair("p", "Yes") is None


def test_keyword_pairs_differ_in_one_word_at_equal_length():
    rng = random.Random(0)
    for a in ANSWERS:
        q = keyword_pair("p", a, rng)
        wb, ww = words(q.better), words(q.worse)
        assert len(wb) == len(ww) and sum(x != y for x, y in zip(wb, ww)) == 1
        assert has_keyword(q.better) and not has_keyword(q.worse) and wb.count("please") == 1
        assert prefers_keyword("p", q.better) - prefers_keyword("p", q.worse) == pytest.approx(1.0)


@pytest.mark.parametrize("prop", [ends_with_question, has_keyword])
def test_length_pairs_keep_the_property_and_only_add_words(prop):
    rng = random.Random(1)
    for a in ANSWERS:
        q = length_pair("p", a, rng, prop)
        assert prop(q.better) == prop(q.worse)
        assert count_words(q.better) - count_words(q.worse) >= 10
        # the shorter side is the answer itself, and its words stay in order in the longer one
        assert q.worse == a
        it = iter(words(q.better))
        assert all(w in it for w in words(q.worse))


def test_exclamation_pairs_differ_in_the_mark_only():
    from rlhf.experiments.oracles import prefers_exclamation
    from rlhf.experiments.probes import exclamation_pair

    q = exclamation_pair("p", "Wow! That is a fine question. Here is the answer")
    assert q.better.endswith("!") and "!" not in q.worse and words(q.better) == words(q.worse)
    assert prefers_exclamation("p", q.better) - prefers_exclamation("p", q.worse) == 1.0
    assert exclamation_pair("p", "Hi!") is None  # one word: nothing to hold equal


def test_build_probes_per_oracle_and_seeded():
    prop, length = build_probes("prefers_question_ending", PROMPTS, ANSWERS, seed=3)
    assert len(prop) == len(length) == 4 and {p.kind for p in prop} == {"property"}
    assert [p.prompt for p in prop] == PROMPTS
    assert build_probes("prefers_question_ending", PROMPTS, ANSWERS, seed=3) == (prop, length)
    prop, length = build_probes("prefers_concise", PROMPTS, ANSWERS)
    assert prop == [] and len(length) == 4  # for a length preference, length is the property
    with pytest.raises(ValueError, match="4 prompts but 3 answers"):
        build_probes("prefers_keyword", PROMPTS, ANSWERS[:3])


def test_probe_report_on_a_length_only_scorer():
    prop, length = build_probes("prefers_question_ending", PROMPTS, ANSWERS)
    report = probe_report(lambda ps, ts: [0.1 * count_words(t) for t in ts], prop, length)
    # blind to the end mark (equal lengths tie, and a tie is not a win), sure about length
    assert report["rm_probe_property_accuracy"] == 0.0 and report["rm_probe_property_pairs"] == 4
    assert report["rm_probe_longer_wins"] == 1.0 and report["rm_probe_length_pairs"] == 4
    assert report["rm_probe_score_per_10_words"] == pytest.approx(1.0)
    seer = probe_report(lambda ps, ts: [float(ends_with_question(t)) for t in ts], prop, length)
    assert seer["rm_probe_property_accuracy"] == 1.0 and seer["rm_probe_score_per_10_words"] == 0.0
    empty = probe_report(lambda ps, ts: [], [], [])
    assert math.isnan(empty["rm_probe_property_accuracy"]) and empty["rm_probe_length_pairs"] == 0


# ---- ODIN -------------------------------------------------------------------------------


def test_pearson_matches_a_direct_computation():
    a, b = torch.tensor([1.0, 2.0, 4.0, 7.0]), torch.tensor([3.0, 1.0, 0.0, 5.0])
    ma, mb = a.mean(), b.mean()
    direct = ((a - ma) * (b - mb)).sum() / math.sqrt(((a - ma) ** 2).sum() * ((b - mb) ** 2).sum())
    assert pearson(a, b).item() == pytest.approx(direct.item(), rel=1e-6)
    assert pearson(a, torch.full((4,), 2.0)).item() == 0.0  # a constant carries no signal


def test_odin_disentangle_loss_formula():
    q = torch.tensor([0.5, -0.2, 0.3, 0.9], requires_grad=True)
    ln = torch.tensor([3.0, 1.0, 2.0, 0.0], requires_grad=True)  # anti-correlated with length
    lengths = torch.tensor([10.0, 20.0, 35.0, 50.0])
    wq, wl = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, -1.0, 3.0])
    loss, stats = odin_disentangle_loss(q, ln, lengths, wq, wl, length_weight=2.0, ortho_weight=0.5)
    rho_q, rho_l = pearson(q, lengths).item(), pearson(ln, lengths).item()
    ortho = abs(1.0 * 0.5 + 2.0 * -1.0)  # |w_Q · w_L| = 1.5
    assert loss.item() == pytest.approx(2.0 * (abs(rho_q) - rho_l) + 0.5 * ortho, rel=1e-6)
    assert stats["odin_ortho"].item() == pytest.approx(1.5)
    assert stats["odin_length_head_corr"].item() == pytest.approx(rho_l, rel=1e-6)
    loss.backward()
    # descending the loss raises r_L's correlation with length: r_L of the longest text goes up
    assert ln.grad[3] < 0 < ln.grad[0]
    with pytest.raises(ValueError, match="must be equal"):
        odin_disentangle_loss(q, ln[:3], lengths, wq, wl)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return resolve_backbone("tiny", cache_dir=tmp_path_factory.mktemp("rm"))


def test_trainer_odin_trains_both_heads_and_serves_quality(tiny_backbone):
    from rlhf.testing.preferences import SyntheticPreference

    model = load_reward_model(tiny_backbone, max_tokens=64)
    trainer = OnlineRewardTrainer(model, TrainerConfig(lr=1e-3, train_batch_size=16, length_debias="odin"))
    assert model.length_head is not None
    before = model.length_head.weight.detach().clone()
    gen = SyntheticPreference(seed=1)
    stats = list(trainer.train(trainer.ingest([gen.comparison_event() for _ in range(64)]).examples))
    assert len(stats) == 4 and {"odin_loss", "odin_length_head_corr", "bt_loss"} <= set(stats[-1])
    assert not torch.equal(before, model.length_head.weight)  # the optimiser holds the length head
    prompts, texts = [(("user", "hi"),)] * 2, ["a b c", "a b c d e f g"]
    quality, _ = model.score_heads(prompts, texts)
    assert torch.allclose(model.score(prompts, texts), quality.detach())  # served = quality head
    # the checkpointed weights carry the length head, and a clone keeps it
    assert "length_head.weight" in model.state_dict() and model.clone().length_head is not None
    with pytest.raises(ValueError, match="length_debias='lengthy'"):
        OnlineRewardTrainer(model, TrainerConfig(length_debias="lengthy"))


def test_switching_length_debias_keeps_the_weights_and_the_trainer_state(tiny_backbone):
    from rlhf.testing.preferences import SyntheticPreference

    gen = SyntheticPreference(seed=2)
    plain = OnlineRewardTrainer(
        load_reward_model(tiny_backbone, max_tokens=32), TrainerConfig(lr=1e-3, train_batch_size=8)
    )
    list(plain.train(plain.ingest([gen.comparison_event() for _ in range(16)]).examples))
    prompts, texts = [(("user", "hi"),)] * 2, ["a b c", "please a b c d"]
    # none → odin: the served (quality) head is the trained head, the length head starts fresh
    odin = OnlineRewardTrainer(
        load_reward_model(tiny_backbone, max_tokens=32),
        TrainerConfig(lr=1e-3, train_batch_size=8, length_debias="odin"),
    )
    fresh_length = odin.model.length_head.weight.detach().clone()
    odin.model.load_state_dict(plain.model.state_dict())
    odin.load_state_dict(plain.state_dict())
    assert torch.equal(odin.model.score(prompts, texts), plain.model.score(prompts, texts))
    assert torch.equal(odin.model.length_head.weight, fresh_length) and odin.step == plain.step == 2
    list(odin.train(odin.ingest([gen.comparison_event() for _ in range(8)]).examples))  # it trains on
    # odin → none: the length head is dropped, the quality head kept
    back = OnlineRewardTrainer(
        load_reward_model(tiny_backbone, max_tokens=32), TrainerConfig(lr=1e-3, train_batch_size=8)
    )
    back.model.load_state_dict(odin.model.state_dict())
    back.load_state_dict(odin.state_dict())
    assert back.model.length_head is None and back.step == 3
    assert torch.equal(back.model.score(prompts, texts), odin.model.score(prompts, texts))


def test_reward_settings_refuse_an_unknown_length_debias():
    from pydantic import ValidationError

    from services.reward.main import RewardSettings

    assert RewardSettings().reward_length_debias == "none"
    with pytest.raises(ValidationError, match="reward_length_debias"):
        RewardSettings(reward_length_debias="lengthy")
