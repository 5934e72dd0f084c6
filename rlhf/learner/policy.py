"""π_θ and its critic V on one backbone: a causal LM (optionally LoRA-wrapped) + a value head.

The value head reads the same final hidden state the LM head does (TRL's
AutoModelForCausalLMWithValueHead, InstructGPT's shared-trunk critic), so one forward
pass gives both log-probs and values. Only response positions go through the LM head:
with a 49k vocabulary the (B, L, V) logits over the prompt would be the biggest tensor
of the step and are never used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.learner.config import PPOConfig

FULL = "full"
LORA = "lora"


class PolicyWithValueHead(nn.Module):
    def __init__(self, lm: nn.Module, finetune: str, base_model: str):
        super().__init__()
        self.lm = lm  # transformers causal LM, or a peft PeftModel around one
        self.finetune = finetune
        self.base_model = base_model  # the folder π_ref was loaded from
        hidden = self.causal_lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)  # (…, H) → (…, 1) V(s_t)
        # V starts at 0 everywhere: a random head would add noise of the size of |h| to
        # every advantage (whitening then drowns the score) until the critic catches up.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._reference: nn.Module | None = None

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model (LoRA layers injected when finetune == "lora")."""
        return self.lm.get_base_model() if self.finetune == LORA else self.lm

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        prompt_width: int,
        response_width: int,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, R, V) and values V(s_t) (B, R) at the response positions (see response_logits)."""
        logits, hidden = response_logits(
            self.causal_lm, input_ids, attention_mask, position_ids, prompt_width, response_width, temperature
        )
        return logits, self.value_head(hidden).squeeze(-1).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- weights: checkpoints and the weight store --------------------------------------

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes in π_θ: the LoRA adapter (peft's adapter_model keys) or
        the full state dict (HF names, tied lm_head dropped as save_pretrained does)."""
        if self.finetune == LORA:
            from peft import get_peft_model_state_dict

            return {k: v.detach() for k, v in get_peft_model_state_dict(self.lm).items()}
        return _untie(self.lm.state_dict())

    def load_policy_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.finetune == LORA:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.lm, tensors)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"adapter does not fit this model: unexpected keys {unexpected[:3]}")
            return
        missing, unexpected = self.lm.load_state_dict(tensors, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise ValueError(f"weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def adapter_config(self) -> dict[str, Any] | None:
        """peft's adapter_config.json for a LoRA policy (what vLLM's LoRARequest reads)."""
        if self.finetune != LORA:
            return None
        config = self.lm.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = self.base_model
        return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}

    # --- π_ref for the drift gate -------------------------------------------------------

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference policy as a causal LM: the base with the adapter switched
        off (LoRA: no second copy), or a frozen copy of the base folder (full fine-tuning)."""
        if self.finetune == LORA:
            with self.lm.disable_adapter():
                yield self.lm.get_base_model()
            return
        if self._reference is None:
            from rlhf.models import load_causal_lm

            ref = load_causal_lm(self.base_model, device=self.device).requires_grad_(False)
            object.__setattr__(self, "_reference", ref)  # not a submodule: no grads, no checkpoints
        yield self._reference


def response_logits(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
    response_width: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits at the response positions, and the hidden states they came from.

    input_ids, attention_mask, position_ids  # (B, P+R) prompt left-padded to P,
                                             #  response right-padded to R
    returns logits  # (B, R, V) for response token t, divided by temperature
            hidden  # (B, R, H) the final hidden state before response token t (s_t)
    """
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, P+R, H)
    # position i predicts token i+1: P-1 .. P+R-2 predict the R response tokens
    hidden = hidden[:, prompt_width - 1 : prompt_width + response_width - 1]  # (B, R, H)
    logits = lm.get_output_embeddings()(hidden)  # (B, R, V)
    if temperature != 1.0:
        logits = logits / temperature
    return logits, hidden


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); safetensors
    refuses shared storage and loaders re-tie from the config."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = tensor.detach()
    return out


def build_policy(model_dir: str | Path, cfg: PPOConfig, device: str | torch.device = "cpu") -> PolicyWithValueHead:
    """Load π_θ from a local HF folder, wrap it for LoRA or full fine-tuning, add V."""
    from rlhf.models import load_causal_lm

    lm = load_causal_lm(model_dir, dtype=torch.float32, device=device)
    if cfg.finetune == LORA:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        cuda = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # lora_A's random init: same seed, same adapter
            torch.manual_seed(cfg.seed)
            lm = get_peft_model(lm, lora)
    else:
        lm.requires_grad_(True)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyWithValueHead(lm, cfg.finetune, str(model_dir)).to(device)
    # PPO compares log-probs of two passes over the same tokens: no dropout anywhere.
    return policy.eval()
