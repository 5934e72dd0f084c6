"""Where a model runs and how its batches are padded, decided once for every service.

resolve_device("auto")     cuda when a GPU is visible, else cpu
set_torch_threads(n)       torch's intra-op threads; 0 keeps torch's default (all cores)
pad_id(tokenizer)          the token id written into padded positions
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """ "auto" → cuda when a GPU is visible, else cpu; anything else as torch spells it
    ("cpu", "cuda", "cuda:1")."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_torch_threads(n: int) -> None:
    """Use `n` intra-op threads in this process (the machine is shared by several services);
    0 or less leaves torch's default."""
    if n > 0:
        torch.set_num_threads(n)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS, else 0.

    The value never changes a result: every padded position is masked out of attention,
    position ids count only real tokens, and no log-prob, score or loss is read at a padded
    position. It only has to be a real token id, and EOS (rather than an arbitrary 0) also
    keeps `generate` honest: the rows it fills after their end hold the stop token, which
    every reader cuts at."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
