"""Sampling text from a language model, one token at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tinylm.errors import TinylmError
from tinylm.tokenizers import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str, name: str = "prompt") -> list[int]:
    """The prompt's token ids, or a one-line error naming the option the prompt came from."""
    try:
        ids = tokenizer.encode(prompt)
    except TinylmError as error:
        raise TinylmError(f"{name}: {error}") from None
    if not ids:
        raise TinylmError(f"{name} is empty; give at least one character, e.g. a newline")
    return ids


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab). Temperature 0 is greedy; top-k keeps only the k likeliest."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are sampled.

    The prompt goes through the model once (prefill, into a KV cache); after that each step feeds only the newest
    token. When the cache is full (block_size positions), it is emptied and refilled with the last block_size // 2
    tokens, so the model always sees at least half a context and a refill's cost is shared by the block_size // 2
    cheap steps that follow it. (A window sliding by one token would need a whole-context forward pass per token.)
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    block_size = model.config.block_size
    kept_on_refill = max(1, block_size // 2)
    tokens = list(prompt)
    cache = model.new_kv_cache(batch_size=1)
    to_feed = tokens[-block_size:]
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if cache.length + len(to_feed) > cache.capacity:
                cache.reset()
                to_feed = tokens[-kept_on_refill:]
            logits, _ = model(torch.tensor([to_feed], dtype=torch.long, device=device), kv_cache=cache)
            next_token = int(sample_next_token(logits[:, -1, :], temperature, top_k, generator))
            tokens.append(next_token)
            to_feed = [next_token]
            yield next_token
    finally:
        model.train(was_training)
