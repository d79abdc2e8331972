"""Token files read through memory maps, cut into (input, target) windows at random positions for training and
evaluation; the generator that draws them is the resumable position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenShards:
    """The token files of one split as one dataset. No window ever crosses the end of a file."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in paths]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def longest_file(self) -> int:
        """Tokens in the longest file: the longest window that can be drawn is this long."""
        return max((len(s) for s in self.shards), default=0)

    def sample_batch(
        self, batch_size: int, block_size: int, generator: torch.Generator, rows: slice | None = None
    ) -> tuple[torch.Tensor, ...]:
        """`batch_size` windows at uniformly random positions: inputs (B, T) and the same shifted by one (B, T).

        `rows` keeps only those rows of the batch: the processes of a distributed run draw the same batch from
        identically seeded generators and each reads its own rows, so together they train on what one process would.
        """
        starts_per_shard = np.array([max(len(s) - block_size, 0) for s in self.shards])
        if starts_per_shard.sum() == 0:
            raise ValueError(f"no file holds {block_size + 1} tokens")
        starts = torch.randint(int(starts_per_shard.sum()), (batch_size,), generator=generator).numpy()[
            rows or slice(None)
        ]
        first_start = np.concatenate([[0], np.cumsum(starts_per_shard)])
        shard_of = np.searchsorted(first_start[1:], starts, side="right")
        positions = (starts - first_start[shard_of])[:, None] + np.arange(block_size + 1)
        windows = np.empty(positions.shape, dtype=np.int64)
        for shard in np.unique(shard_of):  # one gather per file rather than one per row
            windows[shard_of == shard] = self.shards[shard][positions[shard_of == shard]]
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]
