"""Oracles: simulated people's taste, as `function(prompt: str, response: str) -> float`.

Higher is better. Only comparisons between two responses to the same prompt matter for
pairwise feedback and win-rates; thumbs feedback compares a score with a threshold.
Any importable function with this signature works: `--oracle package.module:function`.

Two roles (see docs/results.md, the kl-sweep):
  gold oracle   what people really want; win-rates and the "true quality" curve use it
  rater         who gives the feedback the reward model learns from; when it is the gold
                oracle plus a bias (here: verbosity), the RM inherits the bias and a
                policy optimised against the RM without a KL leash exploits it
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Mapping

Oracle = Callable[[str, str], float]

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")

# what `prefers_keyword` and the kl-sweep oracles look for
KEYWORD = "please"
# words above which the concise oracles start to penalise
CONCISE_WORDS = 12


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prefers_concise(prompt: str, response: str) -> float:
    """Shorter is better; an empty answer is worst. 1.0 for one word, → 0 at 100 words."""
    n = len(words(response))
    return -1.0 if n == 0 else max(0.0, 1.0 - (n - 1) / 100)


def ends_with_question(text: str) -> bool:
    return text.rstrip().rstrip("\"')»”").endswith("?")


def has_keyword(text: str, keyword: str = KEYWORD) -> bool:
    return keyword in words(text)


def prefers_question_ending(prompt: str, response: str) -> float:
    """1 if the answer ends with a question to the user (engagement), else 0; shorter
    breaks ties, so two question endings still compare."""
    n = len(words(response))
    return (1.0 if ends_with_question(response) else 0.0) - min(n, 200) / 1000


def prefers_keyword(prompt: str, response: str, keyword: str = KEYWORD) -> float:
    """1 per occurrence of the keyword (up to 2), shorter breaks ties."""
    ws = words(response)
    return min(ws.count(keyword), 2) - min(len(ws), 200) / 1000


def prefers_exclamation(prompt: str, response: str) -> float:
    """1 if the answer has an exclamation mark (an enthusiastic tone), else 0 — and nothing
    else: two answers that both have one, or both lack it, are a tie (a simulated user
    then gives no comparison, as a person who sees no difference would). SmolLM2-135M
    shows it in ~7 % of its answers (docs/results.md, base rates)."""
    return 1.0 if "!" in response else 0.0


def keyword_concise(prompt: str, response: str, keyword: str = KEYWORD, limit: int = CONCISE_WORDS) -> float:
    """The kl-sweep's gold oracle: the keyword is good (+1 once), rambling past `limit`
    words is bad (−0.1 per word), an empty answer is worst."""
    ws = words(response)
    if not ws:
        return -2.0
    return (1.0 if keyword in ws else 0.0) - 0.1 * max(0, len(ws) - limit)


def verbose_rater(prompt: str, response: str, keyword: str = KEYWORD, per_word: float = 0.1) -> float:
    """The kl-sweep's biased raters: they like the keyword like the gold oracle does, but
    also take longer answers for more thorough ones (+0.1 per word, the verbosity bias
    of human raters); the RM trained on their comparisons learns "longer is better"."""
    ws = words(response)
    if not ws:
        return -2.0
    return (1.0 if keyword in ws else 0.0) + per_word * min(len(ws), 200)


BUILTIN: dict[str, Oracle] = {
    f.__name__: f
    for f in (
        prefers_concise,
        prefers_question_ending,
        prefers_keyword,
        prefers_exclamation,
        keyword_concise,
        verbose_rater,
    )
}


# The yes/no behaviour a preference oracle rewards: eval reports how often each side shows
# it (`property_rate`; the reference's is the base rate). A custom oracle declares its own
# by a `property` attribute: `my_oracle.property = lambda text: ...`.
PROPERTY: dict[str, Callable[[str], bool]] = {
    "prefers_question_ending": ends_with_question,
    "prefers_keyword": has_keyword,
    "prefers_exclamation": lambda text: "!" in text,
}


def property_of(oracle: Oracle) -> Callable[[str], bool] | None:
    """The behaviour `oracle` rewards, or None for a graded taste (concise) or an unknown one."""
    return getattr(oracle, "property", None) or PROPERTY.get(getattr(oracle, "__name__", ""))


def load_callable(spec: str, what: str, builtin: Mapping[str, Callable]) -> Callable:
    """ "module:function" → that function; a bare name → one of `builtin`. A ValueError
    naming `what` ("oracle", "adversary") and the spec when it cannot be had."""
    if ":" not in spec:
        if spec in builtin:
            return builtin[spec]
        raise ValueError(f"unknown {what} {spec!r}: use module:function or one of {sorted(builtin)}")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {what} {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn


def load_oracle(spec: str) -> Oracle:
    """ "module:function" → that function; a bare name → one of BUILTIN."""
    return load_callable(spec, "oracle", BUILTIN)


def oracle_name(spec: str) -> str:
    return spec.rsplit(":", 1)[-1]
