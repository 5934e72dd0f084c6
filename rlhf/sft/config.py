"""SFTConfig: every setting of `rlhf sft`, with its default (light: no torch, for the CLI parser)."""

from __future__ import annotations

from dataclasses import dataclass

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SFTConfig:
    steps: int = 16  # optimizer steps in all (a rerun with more resumes)
    batch_size: int = 4  # examples per step
    lr: float | None = None  # AdamW learning rate (constant); None: 1e-3 with LoRA, 2e-5 full
    lora: bool = False  # train a LoRA adapter (peft), merged into the weights at the end
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    eval_fraction: float = 0.1  # share of examples held out for the eval loss (at least 1 of ≥ 2)
    eval_every: int = 0  # steps between eval losses; 0: before and after training only
    save_every: int = 20  # steps between checkpoints (one is always written at the end)
    max_length: int = 1024  # longer tokenised conversations are left out (and counted)
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # held-out split, data order, LoRA init

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora else 2e-5)
