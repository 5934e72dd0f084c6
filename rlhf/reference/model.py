"""The frozen reference policy π_ref: per-token log-probs of responses, nothing else.

π_ref is the initial policy, loaded once in eval mode and never trained. Its log-probs
must be exactly those of the initial policy so that KL(π_θ‖π_ref) is exactly 0 before
the first PPO step. `batching="exact"` (default) groups a batch by sequence length and
runs each group unpadded: every item is bitwise equal to `sequence_logprobs` on its
own. `batching="padded"` runs one padded forward per chunk (faster with mixed lengths);
items then differ from the unbatched values by float rounding (~1e-6).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from rlhf.models import batch_sequence_logprobs, load_causal_lm, load_tokenizer, pad_id

EXACT = "exact"
PADDED = "padded"


class ReferenceModel:
    def __init__(
        self, path: str | Path, batching: str = EXACT, max_batch_tokens: int = 8192, device: str | torch.device = "cpu"
    ):
        """`max_batch_tokens`: padded tokens per forward pass (bounds activation memory)."""
        if batching not in (EXACT, PADDED):
            raise ValueError(f"batching must be {EXACT!r} or {PADDED!r}, got {batching!r}")
        self.path = Path(path)
        self.batching = batching
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device)
        self.model = load_causal_lm(self.path, device=self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        tokenizer = load_tokenizer(self.path)
        self.pad_id = pad_id(tokenizer)
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0)

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Item i: (T_i,) fp32 log π_ref(response_t | prompt, response_<t), T_i = len(responses[i])."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out: list[torch.Tensor | None] = [None] * len(prompts)
        if self.batching == EXACT:
            groups: dict[int, list[int]] = defaultdict(list)  # total length → item indices
            for i, (p, r) in enumerate(zip(prompts, responses)):
                groups[len(p) + len(r)].append(i)
            chunks = [
                idx[j : j + max(1, self.max_batch_tokens // n)]
                for n, idx in sorted(groups.items())
                for j in range(0, len(idx), max(1, self.max_batch_tokens // n))
            ]
        else:
            # sorted by length so a chunk wastes little on padding
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
            chunks, chunk, width = [], [], 0
            for i in order:
                n = len(prompts[i]) + len(responses[i])
                if chunk and max(width, n) * (len(chunk) + 1) > self.max_batch_tokens:
                    chunks.append(chunk)
                    chunk, width = [], 0
                chunk.append(i)
                width = max(width, n)
            if chunk:
                chunks.append(chunk)
        for idx in chunks:
            lps = batch_sequence_logprobs(
                self.model, [prompts[i] for i in idx], [responses[i] for i in idx], self.pad_id
            )
            for i, lp in zip(idx, lps):
                out[i] = lp
        return out  # type: ignore[return-value]
