"""`rlhf export`: a LoRA version in a weight store, stored the way the learner stores one
(peft adapter keys, its adapter_config, base_model in the manifest, promoted), exported to a
merged folder that plain `transformers` loads and that reproduces what the generator serves
for that version; and the vLLM CPU engine loads the folder as it is (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from rlhf.cli import main
from rlhf.models import chat_prompt_ids, load_tokenizer, sequence_logprobs
from rlhf.testing.lora import make_random_lora
from rlhf.weightstore import WeightStore

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]  # check_vllm's question
MAX_TOKENS = 16
PROMOTED = {"promoted": True, "step": 4}


@pytest.fixture(scope="module")
def stack_state(tmp_path_factory, tiny_model_dir) -> Path:
    """A state dir whose weights/ holds version 3 (full, another model's weights) and
    version 5 (a LoRA adapter on the tiny base), as the learner writes them."""
    from rlhf.models import build_tiny_model

    state = tmp_path_factory.mktemp("export-state")
    store = WeightStore(state / "weights")
    other = build_tiny_model(state / "other", seed=1, initializer_range=0.2)
    store.put(3, load_file(str(other / "model.safetensors")), base_model=str(tiny_model_dir), meta=PROMOTED)
    tensors, cfg = make_random_lora(tiny_model_dir, state / "adapter", rank=8, seed=3)
    cfg["base_model_name_or_path"] = str(tiny_model_dir)  # what PolicyWithValueHead.adapter_config writes
    store.put(5, tensors, fmt="lora", adapter_config=cfg, parent=3, base_model=str(tiny_model_dir), meta=PROMOTED)
    return state


def export(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["export", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def served_greedy(state: Path, base: Path, version: int) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy token ids, their log-probs) from the generator's transformers
    backend with `version` loaded from the weight store."""
    from rlhf.generation import Generator, Limits, SampleOut, Sampling, make_backend

    async def run():
        gen = Generator(
            make_backend("transformers", base),
            base,
            Limits(max_model_len=256),
            state / "weights",
            state / "generator-work",
        )
        await gen.start()
        try:
            await gen.load_version(version)
            ids = gen.chat_ids(QUESTION)
            sample = SampleOut(0)
            async for served, d in gen.generate(ids, Sampling(temperature=0.0, max_tokens=MAX_TOKENS), "t"):
                assert served == version
                sample.add(d)
            return ids, sample.token_ids, sample.logprobs
        finally:
            await gen.stop()

    return asyncio.run(run())


def hf_greedy(folder: Path) -> tuple[list[int], list[int], transformers.PreTrainedModel]:
    """Plain transformers, nothing of this project: from_pretrained and generate."""
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return list(prompt), out[0, len(prompt) :].tolist(), model


@pytest.mark.parametrize("version", [5, 3], ids=["lora", "full"])
def test_exported_folder_reproduces_the_served_version(capsys, tmp_path, stack_state, tiny_model_dir, version):
    out = tmp_path / f"v{version}"
    rc, stdout, err = export(capsys, "--state-dir", str(stack_state), str(version), str(out))
    assert rc == 0, err
    assert f"version {version} written to {out}" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not names & {"adapter_model.safetensors", "adapter_config.json"}, "LoRA is merged, not shipped"
    meta = json.loads((out / "rlhf_model.json").read_text())
    assert (meta["version"], meta["promoted"]) == (version, True)

    prompt, tokens, model = hf_greedy(out)
    served_prompt, served_tokens, served_logprobs = served_greedy(stack_state, tiny_model_dir, version)
    assert prompt == served_prompt, "the exported chat template renders the prompt the generator sends"
    assert tokens == served_tokens
    assert (sequence_logprobs(model, prompt, tokens) - torch.tensor(served_logprobs)).abs().max() < 1e-4
    # and the version is not the base model: the merge did something
    _, base_tokens, _ = hf_greedy(tiny_model_dir)
    assert tokens != base_tokens


def test_export_errors_are_one_line(capsys, tmp_path, stack_state):
    rc, _, err = export(capsys, "--state-dir", str(stack_state), "9", str(tmp_path / "o"))
    assert rc == 1 and err.count("\n") == 1
    assert "version 9 is not in the weight store" in err and "it holds 3, 5" in err, err
    rc, _, err = export(capsys, "--state-dir", str(tmp_path / "none"), "5", str(tmp_path / "o"))
    assert rc == 1 and "no weight store at" in err and err.count("\n") == 1
    rc, _, err = export(
        capsys, "--state-dir", str(stack_state), "5", str(tmp_path / "o"), "--base-model", str(tmp_path / "gone")
    )
    assert rc == 1 and "is not a model folder; pass --base-model" in err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("x")
    rc, _, err = export(capsys, "--state-dir", str(stack_state), "5", str(theirs))
    assert rc == 1 and "holds files not written by rlhf export" in err and (theirs / "notes.txt").exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_exported_lora_version_loads_in_vllm(capsys, tmp_path, stack_state, tiny_model_dir):
    """vLLM starts its engine in a child process, so `LLM(...)` runs in a script of its own
    (rlhf.models.check_vllm, under `if __name__ == "__main__"`)."""
    pytest.importorskip("vllm")
    out = tmp_path / "v5"
    assert export(capsys, "--state-dir", str(stack_state), "5", str(out))[0] == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.models.check_vllm", str(out), "--max-tokens", str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_tokens = json.loads(re.search(r"token ids: (\[.*\])", proc.stdout).group(1))
    gap = float(re.search(r"max \|logprob vLLM - HF\| over the completion: (\S+)", proc.stdout).group(1))
    _, served_tokens, _ = served_greedy(stack_state, tiny_model_dir, 5)
    assert vllm_tokens == served_tokens
    assert gap < 1e-3, proc.stdout
    assert chat_prompt_ids(load_tokenizer(out), QUESTION) == chat_prompt_ids(load_tokenizer(tiny_model_dir), QUESTION)
