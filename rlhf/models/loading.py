"""Load a local HF folder, build chat prompts, and compute exact sequence log-probs.

``sequence_logprobs`` / ``batch_sequence_logprobs`` are the ground truth that the generator
and reference services are tested against: one plain forward pass, no KV cache, fp32 softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers


def _local_dir(path: str | Path) -> Path:
    # A folder that does not exist must fail here: handed to from_pretrained it would be
    # taken for a hub repo id and trigger a download attempt.
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (no config.json / tokenizer.json); "
            "pass a folder written by save_pretrained, or run `rlhf models prepare`"
        )
    return folder


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a local model folder (never the hub)."""
    return transformers.AutoTokenizer.from_pretrained(_local_dir(path), local_files_only=True)


def load_causal_lm(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> transformers.PreTrainedModel:
    """A causal LM from a local folder, on ``device``, in eval mode (dropout off)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(_local_dir(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ending with the assistant
    header (``add_generation_prompt=True``), as plain Python ints."""
    # transformers 5 returns a BatchEncoding by default; ask for the bare id list.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def _as_ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


@torch.no_grad()
def sequence_logprobs(
    model: transformers.PreTrainedModel,
    prompt_ids: Sequence[int] | torch.Tensor,
    response_ids: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """``(T,)`` fp32 ``log π(response_t | prompt, response_<t)``, T = len(response_ids)."""
    prompt, response = _as_ids(prompt_ids), _as_ids(response_ids)
    if prompt.numel() == 0:
        raise ValueError("prompt_ids is empty: the first response token needs a context")
    device = next(model.parameters()).device
    ids = torch.cat([prompt, response]).unsqueeze(0).to(device)  # (1, P+T)
    logits = model(input_ids=ids).logits[0]  # (P+T, V)
    # logits at position i predict token i+1: positions P-1 .. P+T-2 predict the response.
    p = prompt.numel()
    logp = F.log_softmax(logits[p - 1 : -1].float(), dim=-1)  # (T, V)
    return logp.gather(-1, response.to(device).unsqueeze(-1)).squeeze(-1).cpu()  # (T,)


@torch.no_grad()
def batch_sequence_logprobs(
    model: transformers.PreTrainedModel,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    responses: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    padding_side: str = "left",
) -> list[torch.Tensor]:
    """``sequence_logprobs`` for a batch in one padded forward pass: item i is ``(T_i,)``.

    Padding is masked out of attention, and position ids count only real tokens, so with
    either ``padding_side`` each item matches its unbatched value (up to float rounding).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        return []
    seqs = [(_as_ids(p), _as_ids(r)) for p, r in zip(prompts, responses)]
    if any(p.numel() == 0 for p, _ in seqs):
        raise ValueError("every prompt needs at least one token")
    lengths = [p.numel() + r.numel() for p, r in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L) 1 = real token
    starts = []  # index of each sequence's first real token
    for i, ((p, r), n) in enumerate(zip(seqs, lengths)):
        start = width - n if padding_side == "left" else 0
        ids[i, start : start + n] = torch.cat([p, r])
        mask[i, start : start + n] = 1
        starts.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) 0 at each first real token
    device = next(model.parameters()).device
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
    ).logits  # (B, L, V)
    out = []
    for i, (p, r) in enumerate(seqs):
        first = starts[i] + p.numel() - 1  # position predicting the first response token
        logp = F.log_softmax(logits[i, first : first + r.numel()].float(), dim=-1)  # (T_i, V)
        out.append(logp.gather(-1, r.to(device).unsqueeze(-1)).squeeze(-1).cpu())  # (T_i,)
    return out
