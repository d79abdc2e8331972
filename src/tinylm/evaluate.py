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
from torch import nn

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


def continuation_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids), the context non-empty: the summed log-probability (nats) of the
    continuation after the context, and whether every continuation token is the model's argmax (greedy).

    As lm-evaluation-harness does for its own models: a row is context + continuation cut on the left to the model's
    context + 1 tokens; rows are batched longest first and padded on the right, which a causal model's real tokens
    never see, so no attention mask is needed. A continuation longer than the model's context is scored in windows of
    that many tokens, each read after the tokens before it.

    Continuations of one context (a multiple-choice question's answers) that fit in the model's context with it are
    scored from one pass over the context: its keys and values are cached once and each answer continues them.
    """
    context = model.config.block_size
    results = [(0.0, True)] * len(pairs)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for owner, (context_ids, continuation_ids) in enumerate(pairs):
        if continuation_ids and len(context_ids) + len(continuation_ids) - 1 <= context:
            by_context.setdefault(tuple(context_ids), []).append(owner)
    shared = {key: owners for key, owners in by_context.items() if len(owners) > 1}
    if not hasattr(model, "new_kv_cache"):  # a model without a KV cache scores every pair alone
        shared = {}
    for context_ids, owners in shared.items():
        answers = _shared_context_logprobs(model, list(context_ids), [pairs[o][1] for o in owners], batch_size)
        for owner, answer in zip(owners, answers):
            results[owner] = answer
    done = {owner for owners in shared.values() for owner in owners}
    windows, owners = [], []
    for owner, (context_ids, continuation_ids) in enumerate(pairs):
        if owner in done:
            continue
        stream = context_ids + continuation_ids
        for start in range(len(context_ids), len(stream), context):  # none for an empty continuation: log 1 = 0
            windows.append((stream[:start], stream[start : start + context]))
            owners.append(owner)
    for owner, (logprob, greedy) in zip(owners, _window_logprobs(model, windows, batch_size)):
        total, all_greedy = results[owner]
        results[owner] = (total + logprob, all_greedy and greedy)
    return results


@torch.inference_mode()
def _shared_context_logprobs(
    model: nn.Module, context_ids: list[int], continuations: list[list[int]], batch_size: int
) -> list[tuple[float, bool]]:
    """continuation_logprobs of several continuations of one context, each fitting in the model's context with it:
    the context is read once into a KV cache, which batch_size continuations at a time then extend."""
    device = next(model.parameters()).device
    cache = model.new_kv_cache(1)
    last = model(torch.tensor([context_ids], device=device), kv_cache=cache)[0][0, -1]
    first_log_probs = F.log_softmax(last.float(), dim=-1)  # predicts every continuation's first token
    likeliest_first = int(first_log_probs.argmax())
    results = []
    for first in range(0, len(continuations), batch_size):
        chunk = continuations[first : first + batch_size]
        width = max(len(ids) for ids in chunk) - 1
        later = None
        if width > 0:  # right-padded: a real token never sees the padding after it
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, continuation in enumerate(chunk):
                ids[row, : len(continuation) - 1] = torch.tensor(continuation[:-1])
            rows = cache.repeated(len(chunk), capacity=len(context_ids) + width)
            later = model(ids.to(device), kv_cache=rows)[0]
        for row, continuation in enumerate(chunk):
            total = first_log_probs[continuation[0]].item()
            greedy = likeliest_first == continuation[0]
            if len(continuation) > 1 and later is not None:
                log_probs = F.log_softmax(later[row, : len(continuation) - 1].float(), dim=-1)
                targets = torch.tensor(continuation[1:], device=device)
                total += log_probs.gather(-1, targets[:, None]).sum().item()
                greedy = greedy and bool((log_probs.argmax(-1) == targets).all())
            results.append((total, greedy))
    return results


@torch.inference_mode()
def _window_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int
) -> list[tuple[float, bool]]:
    """continuation_logprobs for continuations that fit in the model's context."""
    context = model.config.block_size
    device = next(model.parameters()).device
    rows = [(context_ids + continuation_ids)[-(context + 1) :] for context_ids, continuation_ids in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        width = len(rows[chunk[0]]) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, index in enumerate(chunk):
            ids[row, : len(rows[index]) - 1] = torch.tensor(rows[index][:-1])
        logits = model(ids.to(device))[0]
        for row, index in enumerate(chunk):
            scored = len(pairs[index][1])
            end = len(rows[index]) - 1
            targets = torch.tensor(rows[index][-scored:], device=device)
            # Only the scored positions in float32: a (batch, context, vocabulary) float32 copy could be gigabytes.
            row_log_probs = F.log_softmax(logits[row, end - scored : end].float(), dim=-1)
            total = row_log_probs.gather(-1, targets[:, None]).sum().item()
            results[index] = (total, bool((row_log_probs.argmax(-1) == targets).all()))
    return results
