"""rlhf.models: tiny models, tokenizer and chat template, exact log-probs, model resolution."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from rlhf.models import (
    batch_sequence_logprobs,
    build_tiny_model,
    build_tiny_reward_backbone,
    chat_prompt_ids,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    reward_backbone_dir,
    sequence_logprobs,
    smollm2_tokenizer_dir,
)
from rlhf.models._fs import COMPLETE_MARKER, atomic_folder

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_model_has_smollm2_shape_and_vllm_friendly_heads(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 2
    assert config["head_dim"] in (32, 64, 80, 96, 112, 128)  # vLLM CPU attention sizes
    assert config["tie_word_embeddings"] is True
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>
    assert (tiny_model_dir / COMPLETE_MARKER).is_file()


def test_tiny_model_is_deterministic_by_seed(tmp_path, tiny_model_dir, tiny_model_dir_b):
    again = build_tiny_model(tmp_path / "again", seed=0)
    a, a2, b = _weights(tiny_model_dir), _weights(again), _weights(tiny_model_dir_b)
    assert a.keys() == a2.keys() == b.keys()
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_build_tiny_model_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_has_chatml_template(tokenizer):
    assert len(tokenizer) == 49152
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None


def test_chat_prompt_ids_round_trip(tokenizer):
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert ids and all(type(i) is int for i in ids)
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_tokenizer_cache_is_reused():
    first = smollm2_tokenizer_dir()
    lines = []
    assert smollm2_tokenizer_dir(progress=lines.append) == first
    assert lines == []  # nothing extracted the second time
    assert (first / COMPLETE_MARKER).is_file()


def test_load_causal_lm_is_in_eval_mode(model):
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_sequence_logprobs_equals_manual_log_softmax(model, tokenizer):
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    response = tokenizer.encode("Paris.", add_special_tokens=False) + [tokenizer.eos_token_id]
    got = sequence_logprobs(model, prompt, response)
    assert got.shape == (len(response),)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]  # (P+T, V)
    logp = F.log_softmax(logits, dim=-1)
    manual = torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])
    torch.testing.assert_close(got, manual)
    assert torch.all(got < 0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_sequence_logprobs_equals_unbatched(model, tokenizer, padding_side):
    prompts = [
        chat_prompt_ids(tokenizer, MESSAGES),
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}]),
        [tokenizer.bos_token_id],
    ]
    responses = [
        tokenizer.encode("The capital is Paris.", add_special_tokens=False),
        tokenizer.encode("Hello! How can I help you today?", add_special_tokens=False),
        [],  # an empty response has no log-probs
    ]
    batched = batch_sequence_logprobs(model, prompts, responses, tokenizer.pad_token_id, padding_side=padding_side)
    assert [t.shape[0] for t in batched] == [len(r) for r in responses]
    for p, r, got in zip(prompts, responses, batched):
        torch.testing.assert_close(got, sequence_logprobs(model, p, r), atol=1e-5, rtol=1e-5)


def test_batch_sequence_logprobs_rejects_bad_input(model):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        batch_sequence_logprobs(model, [[1], [1]], [[2]], pad_id=2)
    with pytest.raises(ValueError, match="padding_side"):
        batch_sequence_logprobs(model, [[1]], [[2]], pad_id=2, padding_side="middle")
    with pytest.raises(ValueError, match="prompt"):
        sequence_logprobs(model, [], [2])


def test_resolve_model_errors_clearly_on_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*'demo'"):
        resolve_model(missing)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_resolve_model_accepts_an_existing_folder(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_loaders_refuse_a_non_model_folder(tmp_path):
    # A missing folder must not fall through to a hub download attempt.
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_tokenizer(tmp_path / "org/name")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_causal_lm(tmp_path)


def test_atomic_folder_leaves_nothing_behind_on_error(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []

    with atomic_folder(final) as tmp:
        (tmp / "v1").write_text("1")
    with atomic_folder(final) as tmp:  # replaces the old folder whole
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE_MARKER, "v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_reward_backbone_dir_is_minilm():
    config = json.loads((reward_backbone_dir() / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384


def test_tiny_reward_backbone_uses_the_minilm_tokenizer(tmp_path):
    folder = build_tiny_reward_backbone(tmp_path / "rm", seed=0)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    real = transformers.AutoTokenizer.from_pretrained(reward_backbone_dir(), local_files_only=True)
    text = "Paris is the capital of France."
    assert tok(text).input_ids == real(text).input_ids
    backbone = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok([text, "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state  # (B, L, H)
    assert hidden.shape[0] == 2 and hidden.shape[-1] == backbone.config.hidden_size
