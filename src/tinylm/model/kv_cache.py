"""The key/value cache that makes generation cost one position of work per new token instead of the whole context."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every position fed so far, for every layer, in preallocated tensors.

    `reserve(n)` claims the next n positions before a forward pass; each layer then `store`s its new keys and values
    there and gets back all of them up to the newest. A cache with no layers (the bigram's) keeps only the length.
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        n_layer: int = 0,
        n_kv_head: int = 1,
        head_dim: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (n_layer, batch_size, n_kv_head, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def reserve(self, count: int) -> int:
        """Claim the next `count` positions and return the first of them."""
        if self.length + count > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} positions and {self.length} are filled: "
                f"{count} more do not fit (reset it first)"
            )
        start = self.length
        self.length += count
        return start

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's keys and values (B, n_kv_head, T, head_dim) for the positions just reserved; return the
        layer's keys and values for every position so far."""
        start = self.length - keys.shape[2]
        self.keys[layer, :, :, start : self.length] = keys
        self.values[layer, :, :, start : self.length] = values
        return self.keys[layer, :, :, : self.length], self.values[layer, :, :, : self.length]

    def repeated(self, count: int, capacity: int | None = None) -> KVCache:
        """A cache of `count` rows, each a copy of this one-row cache's positions so far: a context read once, then
        continued `count` different ways. `capacity`: the positions it holds (default this cache's); a few more than
        the context keep a long-context model's copies small."""
        n_layer, rows, n_kv_head, _, head_dim = self.keys.shape
        if rows != 1:
            raise ValueError(f"only a one-row cache repeats; this one has {rows} rows")
        copy = KVCache(
            count, capacity or self.capacity, n_layer, n_kv_head, head_dim, self.keys.device, self.keys.dtype
        )
        copy.reserve(self.length)
        copy.keys[:, :, :, : self.length] = self.keys[:, :, :, : self.length]
        copy.values[:, :, :, : self.length] = self.values[:, :, :, : self.length]
        return copy
