"""Random LoRA adapters in peft's on-disk layout, for tests and benchmarks of adapter swaps.

The learner writes real adapters with peft; these have the same files and key names, with
both A and B random (peft's default B = 0 would leave the model unchanged)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_random_lora(
    model_dir: Path,
    out_dir: Path,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    init_scale: float = 0.5,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `out_dir` and return
    (tensors, adapter_config), ready for `WeightStore.put(..., fmt="lora")` too."""
    import json

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from rlhf.models import load_causal_lm

    model = load_causal_lm(model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, init_scale / rank**0.5)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return tensors, json.loads((out / "adapter_config.json").read_text())
