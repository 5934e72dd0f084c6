"""rlhf.models end to end: the real demo-model conversion and the tiny model under vLLM."""

import json
import os
import re
import subprocess
import sys

import pytest

from rlhf.models import greedy_reply, prepare_demo_model, resolve_model
from rlhf.models.paths import demo_model_dir


@pytest.mark.slow
def test_prepare_demo_model_converts_gguf_and_answers_paris(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))  # from scratch, tokenizer included
    lines = []
    folder = prepare_demo_model(progress=lines.append)
    assert folder == demo_model_dir() and folder.is_relative_to(tmp_path)
    assert any("[4/4]" in line for line in lines), lines
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert "Paris" in json.loads((folder / "rlhf_prepare.json").read_text())["smoke_reply"]
    assert "Paris" in greedy_reply(folder, "What is the capital of France?")

    again = []
    assert prepare_demo_model(progress=again.append) == folder
    assert again == [f"demo model already prepared at {folder}"]
    assert resolve_model("demo") == folder
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_model_generates_in_vllm_with_hf_logprobs(tiny_model_dir):
    # vLLM spawns its engine process, so it runs in its own interpreter.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.models.check_vllm", str(tiny_model_dir), "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    match = re.search(r"max \|logprob vLLM - HF\| over the completion: (\S+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) < 1e-4
