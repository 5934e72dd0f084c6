"""Each token's bytes (OpenAI's logprobs `bytes`) from the real tokenizer of the tiny model."""

from __future__ import annotations

import pytest

from rlhf.generation.tokens import token_bytes
from rlhf.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("text", ["Hello wörld", " 😀 emoji\n", "tabs\tand  spaces", "日本語のテキスト"])
def test_the_bytes_of_a_text_s_tokens_spell_it(tokenizer, text):
    table = token_bytes(tokenizer)
    ids = tokenizer.encode(text)
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def test_a_character_split_over_tokens_keeps_its_exact_bytes(tokenizer):
    table = token_bytes(tokenizer)
    ids = tokenizer.encode("😀")
    parts = [table[i] for i in ids]
    assert len(parts) > 1, "the emoji is one token in this vocabulary: pick another character"
    assert any(_not_utf8(p) for p in parts) and b"".join(parts) == "😀".encode()


def test_every_token_has_bytes(tokenizer):
    table = token_bytes(tokenizer)
    assert len(table) == len(tokenizer) and all(isinstance(b, bytes) for b in table)
    assert sum(1 for b in table if not b) == 0


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
