"""Loss, perplexity and bits per byte of a model over a whole token split."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinylm.data.loader import TokenShards


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per predicted token, in nats."""
    perplexity: float
    bpb: float
    """Bits per UTF-8 byte of the predicted text: comparable across tokenizers."""
    tokens: int
    """Tokens predicted."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.inference_mode()
def evaluate(model: nn.Module, split: TokenShards, token_bytes: np.ndarray, batch_size: int = 32) -> EvalResult:
    """Predict every token of the split once, in consecutive windows of the model's context.

    Bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted tokens, so a tokenizer that packs more text
    into a token is not rewarded for it.
    """
    device = next(model.parameters()).device
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    byte_lengths = torch.as_tensor(token_bytes, device=device)
    totals = {"nats": 0.0, "tokens": 0, "bytes": 0}

    def score(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        inputs, targets = (torch.stack(t).to(device) for t in zip(*batch))
        logits, _ = model(inputs)
        totals["nats"] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        totals["tokens"] += targets.numel()
        totals["bytes"] += int(byte_lengths[targets].sum())

    batch: list[tuple[torch.Tensor, torch.Tensor]] = []
    for window in split.sequential_windows(block_size):
        if batch and (len(batch) == batch_size or len(window[0]) != len(batch[0][0])):
            score(batch)
            batch = []
        batch.append(window)
    if batch:
        score(batch)
    model.train(was_training)
    loss = totals["nats"] / totals["tokens"]
    bpb = totals["nats"] / math.log(2) / max(totals["bytes"], 1)
    return EvalResult(loss=loss, perplexity=math.exp(loss), bpb=bpb, tokens=totals["tokens"])
