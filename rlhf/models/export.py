"""Merged Hugging Face model folders: what `rlhf sft` writes and what `rlhf export` writes.

A merged folder is plain transformers: config.json, generation_config.json, model.safetensors
(LoRA already merged into the weights), and the tokenizer with its chat template. Nothing of
peft or of this project is needed to load it: `AutoModelForCausalLM.from_pretrained(folder)`,
`vllm.LLM(model=folder)` and `rlhf up --model folder` take it as it is.

`write_model_folder` is the one writer; `export_version` turns a weight-store version (a
full state dict, or a LoRA adapter on the base model its manifest names) into such a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import transformers

from rlhf.models._fs import atomic_folder

INFO_FILE = "rlhf_model.json"  # where a merged folder came from (written beside the weights)


class ExportError(RuntimeError):
    """A merged folder cannot be written: the message is one line naming the version, path
    or field to fix."""


def write_model_folder(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    out: str | Path,
    info: dict[str, Any],
    keep: Iterable[str] = (),
) -> Path:
    """Write `model` (a plain transformers model: merge LoRA first) and `tokenizer` into
    `out`, atomically: a reader sees the old folder or the complete new one. `info` goes to
    rlhf_model.json. Entries of the old `out` named in `keep` (e.g. a training checkpoint)
    are moved into the new folder."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError(
            "the tokenizer has no chat template: the folder would not serve chats; "
            "use a base model whose tokenizer_config.json or chat_template.jinja has one"
        )
    if hasattr(model, "peft_config"):
        raise ExportError("write_model_folder needs a merged model (peft: merge_and_unload() first)")
    out = Path(out)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        for name in keep:
            if (out / name).exists():
                os.rename(out / name, tmp / name)
    return out


def export_version(state_dir: str | Path, version: int, out: str | Path, base_model: str | Path | None = None) -> Path:
    """Write weight-store version `version` of `<state_dir>/weights` into `out` as a merged
    folder. A LoRA version is merged into the base model its manifest names (`base_model`
    overrides it, e.g. when the store moved to another machine); the tokenizer comes from
    that base. ExportError names what is missing."""
    from rlhf.learner.versions import load_version  # the merge the rest of the loop trusts
    from rlhf.models.loading import load_tokenizer
    from rlhf.weightstore import CorruptWeights, UnknownVersion, WeightStore

    out = Path(out).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise ExportError(f"{out} holds files not written by rlhf export or rlhf sft; pass a new or empty folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder")
    store = WeightStore(Path(state_dir).expanduser() / "weights")
    if not store.root.is_dir():
        raise ExportError(
            f"no weight store at {store.root}: pass the --state-dir of a stack whose learner published versions"
        )
    try:
        record = store.get(version)
    except UnknownVersion:
        known = [r.version for r in store.versions()]
        raise ExportError(
            f"version {version} is not in the weight store {store.root} (it holds {_ranges(known) or 'no versions'})"
        ) from None
    except CorruptWeights as e:
        raise ExportError(str(e)) from None
    if not (base_model or record.base_model):
        raise ExportError(f"version {version}'s manifest names no base model; pass --base-model FOLDER")
    base = Path(base_model or record.base_model).expanduser()
    if not (base / "config.json").is_file():
        raise ExportError(
            f"base model {base} (from {'--base-model' if base_model else 'the manifest'}) is not "
            "a model folder; pass --base-model with the folder the learner started from"
        )
    try:
        model = load_version(store, version, base)
    except CorruptWeights as e:
        raise ExportError(f"version {version}: {e}") from None
    except ValueError as e:  # weights of another architecture than the base
        raise ExportError(f"version {version} does not fit base model {base}: {e}") from None
    info = {
        "source": "rlhf export",
        "weight_store": str(store.root),
        "version": version,
        "format": record.format,
        "sha256": record.sha256,
        "base_model": str(base),
        "promoted": record.promoted,
        "meta": record.meta,
    }
    return write_model_folder(model, load_tokenizer(base), out, info)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5"."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and "-" not in out[-1] and int(out[-1]) == n - 1:
            out[-1] = f"{out[-1]}-{n}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == n - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)
