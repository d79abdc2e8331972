"""The bigram baseline: each token looks up a row of next-token logits. No context, no attention.

It is the floor every real model must beat: its loss is the entropy of the next character given only the current one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.model.kv_cache import KVCache


class BigramLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.next_token_logits = nn.Embedding(config.vocab_size, config.vocab_size)
        nn.init.zeros_(self.next_token_logits.weight)  # start from the uniform distribution

    def new_kv_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache with no layers: the bigram needs no past, but generation code treats every model alike."""
        return KVCache(batch_size, self.config.block_size, device=device or self.next_token_logits.weight.device)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kv_cache is not None:
            kv_cache.reserve(tokens.shape[1])
        logits = self.next_token_logits(tokens)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss
