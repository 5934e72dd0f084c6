"""Adversarial raters for `rlhf experiment poisoning`.

An adversary is any importable function `(prompt, answer_a, answer_b, honest_choice) -> choice`
(`--adversary package.module:function`): choices are 0 (a is better), 1 (b is better) or
None (a tie); `honest_choice` is what an honest rater with the oracle's taste would say.
"""

from __future__ import annotations

from typing import Callable, Optional

from rlhf.experiments.oracles import load_callable, words

Choice = Optional[int]  # 0 = a, 1 = b, None = tie
Adversary = Callable[[str, str, str, Choice], Choice]


def flip(prompt: str, answer_a: str, answer_b: str, honest_choice: Choice) -> Choice:
    """The label-flipping attacker: always the opposite of the honest choice (a tie stays a tie)."""
    return None if honest_choice is None else 1 - honest_choice


def prefer_longer(prompt: str, answer_a: str, answer_b: str, honest_choice: Choice) -> Choice:
    """The verbosity pusher: the longer answer (in words) wins, whatever the honest choice;
    equal lengths are a tie."""
    na, nb = len(words(answer_a)), len(words(answer_b))
    return None if na == nb else (0 if na > nb else 1)


BUILTIN: dict[str, Adversary] = {f.__name__: f for f in (flip, prefer_longer)}


def load_adversary(spec: str) -> Adversary:
    """ "module:function" → that function; a bare name → one of BUILTIN."""
    return load_callable(spec, "adversary", BUILTIN)
