"""Loss, perplexity and bits per byte of a language model over a whole split of text, with a sliding window.

The split's documents become one token stream: a separator token, then each document followed by the separator. Every
token after the first is predicted exactly once, so every byte of every document is paid for. The model reads the
stream in windows of `block_size` tokens that start `stride` tokens apart and scores only the tokens no earlier window
scored: with stride = block_size the windows do not overlap (fast); a smaller stride gives each token at least
block_size - stride tokens of context (a better estimate of what the model does with a full context, at
block_size / stride times the cost).

Bits per byte = total nats / ln 2 / UTF-8 bytes of the documents. It does not depend on the tokenizer, so a tinylm
model and a Hugging Face model (tokenizing the same text with its own tokenizer) compare on the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tinylm.errors import TinylmError

LOGITS_PER_BATCH = 1 << 27
"""Most logits held at once (512 MB of fp32): windows are batched up to this, whatever the vocabulary."""
DEFAULT_EVAL_CONTEXT = 1024
"""Longest window unless --block-size says otherwise: a long context (SmolLM2's 8192) is slow on a CPU."""


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per predicted token, in nats."""
    perplexity: float
    bpb: float
    """Bits per UTF-8 byte of the text: comparable across tokenizers."""
    tokens: int
    """Tokens predicted."""
    bytes: int
    """UTF-8 bytes of the text the predicted tokens spell."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def document_tokens(
    documents: Iterable[str], encode: Callable[[str], list[int]], separator: int
) -> tuple[torch.Tensor, int]:
    """The token stream of the documents (separator, doc, separator, doc, ..., separator) and their UTF-8 bytes."""
    stream, total_bytes = [separator], 0
    for document in documents:
        stream += encode(document)
        stream.append(separator)
        total_bytes += len(document.encode())
    return torch.tensor(stream, dtype=torch.long), total_bytes


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) per window: inputs tokens[begin:end] predict tokens[begin+1:end+1], of which the last
    `scored` are new. Together the windows score tokens 1 .. n_tokens-1 once each."""
    scored_until, end = 0, min(block_size, n_tokens - 1)
    while True:
        yield max(end - block_size, 0), end, end - scored_until
        if end == n_tokens - 1:
            return
        scored_until, end = end, min(end + stride, n_tokens - 1)


@torch.inference_mode()
def evaluate(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    text_bytes: int,
    block_size: int,
    stride: int | None = None,
    vocab_size: int = 1,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score the token stream `tokens` (1-D) with `logits_of` ((B, T) ids -> (B, T, vocab) logits)."""
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise TinylmError(f"--stride must be between 1 and the context ({block_size}), not {stride}")
    if len(tokens) < 2:
        raise TinylmError("the split is too short to evaluate: it needs at least one token to predict")
    batch_size = max(1, LOGITS_PER_BATCH // (block_size * vocab_size))
    nats, predicted = 0.0, 0

    def score(batch: list[tuple[int, int, int]]) -> float:
        windows = torch.stack([tokens[begin : end + 1] for begin, end, _ in batch]).to(device)
        scored = batch[0][2]
        logits = logits_of(windows[:, :-1])[:, -scored:]
        return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, -scored:].flatten(), reduction="sum").item()

    batch: list[tuple[int, int, int]] = []
    for window in sliding_windows(len(tokens), block_size, stride):
        begin, end, scored = window
        if batch and (len(batch) == batch_size or (end - begin, scored) != (batch[0][1] - batch[0][0], batch[0][2])):
            nats += score(batch)
            batch = []
        batch.append(window)
        predicted += scored
    nats += score(batch)
    loss = nats / predicted
    return EvalResult(loss, math.exp(loss), nats / math.log(2) / max(text_bytes, 1), predicted, text_bytes)
