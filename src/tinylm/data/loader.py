"""Token files read through memory maps, cut into (input, target) windows at random positions for training and
evaluation (the generator that draws them is the resumable position), or packed into rows that start at document
starts (the step is the resumable position)."""

from __future__ import annotations

import bisect
import math
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


class PackedRows:
    """Rows of `block_size` tokens that each start at a document's start, with documents packed into them best-fit
    (data.packing: bos). Which row holds what follows from the seed alone, so a run resumes at any step.

    A document here begins at the end-of-text separator before it, and every position's target is its true next
    token in the data, so a document's last token still learns to predict the end of text. Each epoch shuffles the
    documents (longer ones cut into row-sized pieces), then fills each row from a sorted pool of the next POOL
    pieces: the oldest piece that starts a document first, then the longest piece that still fits, again and again;
    when none fits, the oldest piece is cut to fill the row and its rest waits in the pool for another row. So every
    token of the split is in one row per epoch, and only those cuts and the pieces of documents longer than a row
    start a part mid-document.
    """

    POOL = 256

    def __init__(self, split: TokenShards, end_of_text: int, block_size: int, seed: int):
        self.split, self.block_size, self.seed = split, block_size, seed
        shards, starts, lengths, opens = [], [], [], []  # per piece of at most one row: where, how long, a start?
        for shard, tokens in enumerate(split.shards):
            document_starts = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == end_of_text)])
            document_lengths = np.diff(np.append(document_starts, len(tokens)))
            cuts = (document_lengths + block_size - 1) // block_size  # pieces per document
            piece_starts = np.repeat(document_starts, cuts) + block_size * _counts_within(cuts)
            document_ends = np.repeat(document_starts + document_lengths, cuts)
            shards.append(np.full(len(piece_starts), shard))
            starts.append(piece_starts)
            lengths.append(np.minimum(block_size, document_ends - piece_starts))
            opens.append(_counts_within(cuts) == 0)
        self.pieces = [np.concatenate(column).tolist() for column in (shards, starts, lengths, opens)]
        self.epochs: list[list[list[tuple[int, int, int]]]] = []

    def epoch(self, index: int) -> list[list[tuple[int, int, int]]]:
        """The rows of epoch `index`, each a list of (shard, start, length) parts."""
        while len(self.epochs) <= index:
            generator = torch.Generator().manual_seed(self.seed + len(self.epochs))
            order = torch.randperm(len(self.pieces[0]), generator=generator).tolist()[::-1]  # popped from the end
            shards, starts, lengths, opens = self.pieces
            pool: list[tuple[int, int, int, int, bool]] = []  # (length, arrival, shard, start, opens), kept sorted
            rows, arrivals = [], 0
            while order or pool:
                while order and len(pool) < self.POOL:
                    i = order.pop()
                    bisect.insort(pool, (lengths[i], arrivals, shards[i], starts[i], opens[i]))
                    arrivals += 1
                first = min((i for i, piece in enumerate(pool) if piece[4]), default=None, key=lambda i: pool[i][1])
                length, _, shard, start, _ = pool.pop(_oldest(pool) if first is None else first)
                row, free = [(shard, start, length)], self.block_size - length
                while free and pool:
                    fits = bisect.bisect_right(pool, (free, math.inf)) - 1
                    if fits >= 0:
                        length, _, shard, start, _ = pool.pop(fits)
                        row.append((shard, start, length))
                        free -= length
                    else:
                        length, arrival, shard, start, _ = pool.pop(_oldest(pool))
                        row.append((shard, start, free))
                        bisect.insort(pool, (length - free, arrival, shard, start + free, False))
                        free = 0
                rows.append(row)
            self.epochs.append(rows)
        return self.epochs[index]

    def batch(self, first_row: int, count: int, rows: slice | None = None) -> tuple[torch.Tensor, ...]:
        """Rows first_row .. first_row + count - 1, counted through the epochs one after another (`rows` keeps some
        of them, as in TokenShards.sample_batch): inputs, targets and each position's document within its row, all
        (B, block_size). A row the epoch left short is padded with targets -1, which predict nothing."""
        wanted = list(range(first_row, first_row + count))[rows or slice(None)]
        inputs = np.zeros((len(wanted), self.block_size), dtype=np.int64)
        targets = np.full((len(wanted), self.block_size), -1, dtype=np.int64)
        documents = np.zeros((len(wanted), self.block_size), dtype=np.int64)
        for i, row_index in enumerate(wanted):
            epoch = 0
            while row_index >= len(self.epoch(epoch)):
                row_index -= len(self.epoch(epoch))
                epoch += 1
            position = 0
            for document, (shard, start, length) in enumerate(self.epoch(epoch)[row_index]):
                tokens = self.split.shards[shard]
                inputs[i, position : position + length] = tokens[start : start + length]
                following = tokens[start + 1 : start + length + 1]  # the last shard's last token has none
                targets[i, position : position + len(following)] = following
                documents[i, position : position + length] = document
                position += length
            documents[i, position:] = documents[i, position - 1] + 1
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(documents)


def _counts_within(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., c - 1 for each c in `counts`, concatenated: each piece's place within its document."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _oldest(pool: list[tuple[int, int, int, int, bool]]) -> int:
    return min(range(len(pool)), key=lambda i: pool[i][1])
