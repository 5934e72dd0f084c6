"""Policy versions: weight-store records ↔ protobuf messages, and loading a version.

A version's manifest `meta` holds the learner's verdict on it (`verdict`): {"step",
"promoted", "kl_to_reference", "kl_budget", "reason"}. Consumers (generators, tests, the
rollout worker) turn a PolicyUpdate back into a model with `load_version`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf.weightstore import FULL, LORA, VersionRecord, WeightStore

if TYPE_CHECKING:
    from rlhf.learner.drift import GateResult

_FORMAT_TO_PROTO = {FULL: 1, LORA: 2}  # rlhf.v1.WeightFormat: WEIGHT_FORMAT_FULL, WEIGHT_FORMAT_LORA


def weight_format_proto(fmt: str) -> int:
    return _FORMAT_TO_PROTO[fmt]


def verdict(step: int, result: GateResult) -> dict[str, Any]:
    """The manifest meta of a version the drift gate judged after PPO step `step`: promoted
    means published for serving (`VersionRecord.promoted`)."""
    return {
        "step": step,
        "promoted": result.passed,
        "kl_to_reference": result.kl,
        "kl_budget": result.budget,
        "reason": result.reason,
    }


def version_info(record: VersionRecord):
    """rlhf.v1.PolicyVersionInfo of a stored version."""
    from rlhf.v1 import learner_pb2

    meta = record.meta
    return learner_pb2.PolicyVersionInfo(
        version=record.version,
        step=int(meta.get("step", 0)),
        created_unix_ms=record.created_unix_ms,
        uri=record.path,
        sha256=record.sha256,
        format=weight_format_proto(record.format),
        kl_to_reference=float(meta.get("kl_to_reference", 0.0)),
        promoted=bool(meta.get("promoted", False)),
        reason=str(meta.get("reason", "")),
    )


def load_version(
    store: WeightStore, version: int, base_model_dir: str | Path, device: str = "cpu", expected_sha256: str = ""
) -> torch.nn.Module:
    """A plain transformers causal LM with the version's weights (LoRA merged into the base),
    sha256-checked; what a generator or a test samples from."""
    from rlhf.models import load_causal_lm

    record, tensors = store.load(version, expected_sha256)
    model = load_causal_lm(base_model_dir, device=device)
    if record.format == FULL:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise ValueError(f"version {version} does not fit {base_model_dir}")
        model.tie_weights()
        return model.eval()
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = dict(record.adapter_config or {})
    allowed = set(LoraConfig.__dataclass_fields__)
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in config.items() if k in allowed}))
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in tensors.items()})
    return peft_model.merge_and_unload().eval()
