"""Parts of `rlhf experiment poisoning` that need no gateway: the one "module:function"
resolver behind --oracle and --adversary (each error names what and the spec), the two
built-in adversaries, and the best-of-n win-rate of an RM's policy against the oracle."""

from __future__ import annotations

import pytest
import torch

from rlhf.experiments import adversaries, oracles
from rlhf.experiments.poisoning import Item, best_of_n_win_rate, oracle_best_of_n_win_rate


def test_adversaries_load_like_oracles():
    assert adversaries.load_adversary("flip") is adversaries.flip
    assert adversaries.load_adversary("rlhf.experiments.adversaries:prefer_longer") is adversaries.prefer_longer
    assert adversaries.flip("q", "a", "b", 0) == 1 and adversaries.flip("q", "a", "b", None) is None
    assert adversaries.prefer_longer("q", "one two three", "one", 1) == 0


@pytest.mark.parametrize(("load", "what"), [(adversaries.load_adversary, "adversary"), (oracles.load_oracle, "oracle")])
@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_thing", "unknown {what} 'no_such_thing': use module:function or one of"),
        ("no.such.module:f", "cannot load {what} 'no.such.module:f'"),
        ("rlhf.experiments.oracles:missing", "cannot load {what} 'rlhf.experiments.oracles:missing'"),
        ("rlhf.experiments.oracles:KEYWORD", "{what} 'rlhf.experiments.oracles:KEYWORD' is not callable"),
    ],
)
def test_resolver_errors_name_what_and_the_spec(load, what, spec, says):
    with pytest.raises(ValueError) as e:
        load(spec)
    assert says.format(what=what) in str(e.value)


class ScoresByLength:
    """A stand-in RM: scores an answer by its word count, times `sign`."""

    def __init__(self, sign: float):
        self.sign = sign

    def score(self, prompts, responses):
        return torch.tensor([self.sign * len(r.split()) for r in responses])


def group(prompt: str, answers: list[str]) -> list[Item]:
    ids = [f"{prompt}-{i}" for i in range(len(answers))]
    return [
        Item(prompt, ids[x], answers[x], ids[y], answers[y], None)
        for x in range(len(answers))
        for y in range(x + 1, len(answers))
    ]


def test_best_of_n_win_rate_against_a_random_pick():
    groups = [group("p1", ["one", "one two", "one two three"]), group("p2", ["a b", "a b c d", "a"])]
    concise = oracles.prefers_concise
    # the RM that likes short answers picks the oracle's favourite: beats 2 of 3, ties itself (½)
    assert best_of_n_win_rate(ScoresByLength(-1), groups, concise) == pytest.approx(2.5 / 3)
    assert oracle_best_of_n_win_rate(groups, concise) == pytest.approx(2.5 / 3)
    # the RM that likes long answers picks the worst: loses to 2, ties itself
    assert best_of_n_win_rate(ScoresByLength(+1), groups, concise) == pytest.approx(0.5 / 3)
