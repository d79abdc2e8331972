"""Sampling text from a language model: samplers, a KV-cached decode loop, and text streamed as it is produced.

- `sample_next_token` turns a row of logits into a token: repetition penalty, then temperature, then the filters
  `keep_top_k`, `keep_top_p` and `keep_min_p`, then a draw (or the argmax at temperature 0).
- `generate_tokens` is the loop: a batch of prompts, one position per step, the model fed through `ContextWindow`.
- `stream_text` turns each row's tokens into text pieces as they come, cut exactly before a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tinylm.config import SampleConfig
from tinylm.errors import TinylmError
from tinylm.tokenizers import Tokenizer

DECODE_CONTEXT_TOKENS = 4
"""Prompt tokens decoded before the first new one, so a token's text is what it reads like after the prompt."""
MAX_PENDING_TOKENS = 8
"""Tokens held back waiting for a whole character before they are shown anyway (UTF-8 needs at most 4 bytes)."""


def encode_prompt(tokenizer: Tokenizer, prompt: str, name: str = "prompt") -> list[int]:
    """The prompt's token ids, or a one-line error naming the option the prompt came from."""
    try:
        ids = tokenizer.encode(prompt)
    except TinylmError as error:
        raise TinylmError(f"{name}: {error}") from None
    if not ids:
        raise TinylmError(f"{name} is empty; give at least one character, e.g. a newline")
    return ids


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: a token already in the text (`seen`, bool (B, vocab)) gets its logit divided by
    `penalty` when positive and multiplied by it when negative, so a penalty above 1 always makes it less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Only the k likeliest tokens of each row stay possible."""
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: only the smallest set of likeliest tokens whose probabilities sum to at least p stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token goes when the likelier tokens before it already reach p; so the likeliest always stays.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling: only tokens at least `min_p` times as likely as the likeliest stay. The bar moves with the
    model's confidence: strict when one token dominates, lenient when many are plausible."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def sample_next_token(
    logits: torch.Tensor, sampling: SampleConfig, seen: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab), as a (B,) tensor."""
    logits = penalize_repetition(logits.float(), seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        logits = keep_top_k(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = keep_top_p(logits, sampling.top_p)
    if sampling.min_p > 0.0:
        logits = keep_min_p(logits, sampling.min_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(-1)


class ContextWindow:
    """Feeds a growing batch of token rows to the model and returns the logits of the token that comes next.

    With the KV cache, a step runs the model over the new tokens only. The cache holds `block_size` positions; when the
    text outgrows it, the cache is refilled from the last three quarters of a context of text (positions are absolute,
    so cached keys cannot simply be shifted), which costs one forward pass every `block_size / 4` tokens and leaves the
    model at least 3/4 of its context. Without the cache, every step runs the model over the last `block_size` tokens:
    the reference the cache must match, and the baseline of bench/decode.py.
    """

    def __init__(self, model: nn.Module, batch_size: int, use_cache: bool = True):
        self.model = model
        self.block_size = model.config.block_size
        self.kept_on_refill = self.block_size - self.block_size // 4
        self.cache = model.new_kv_cache(batch_size) if use_cache else None
        self.fed = 0
        """Tokens of the text already given to the model: the cache holds the last `cache.length` of them."""

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) for the token after `tokens` (B, T), where `tokens` extends what was given before."""
        if self.cache is None:
            return self.model(tokens[:, -self.block_size :])[0][:, -1]
        length = tokens.shape[1]
        if self.cache.length + length - self.fed > self.block_size:
            self.cache.reset()
            self.fed = max(length - self.kept_on_refill, 0)
        logits, _ = self.model(tokens[:, self.fed :], kv_cache=self.cache)
        self.fed = length
        return logits[:, -1]

    def slide(self, count: int) -> None:
        """The caller dropped the first `count` columns of the tokens it passes (see generate_tokens)."""
        self.fed -= count


@torch.inference_mode()
def generate_tokens(
    model: nn.Module, prompts: list[list[int]], sampling: SampleConfig, use_cache: bool = True
) -> Iterator[list[int | None]]:
    """Sample `sampling.max_new_tokens` tokens after each prompt. Each step yields one entry per prompt: the new token,
    or None while that prompt is still being read or once it has all its tokens.

    Prompts of different lengths advance in lockstep, one position per step: a row still inside its prompt is fed its
    own next prompt token instead of a sample. So every row's t-th token sits at position t, with no padding and no
    attention mask, and learned positions and RoPE alike see exactly what they would see for that prompt alone.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shortest, longest = int(lengths.min()), int(lengths.max())
    total = longest + sampling.max_new_tokens
    # Memory is bounded by the context, never by max_new_tokens (which may be huge: text until a stop token): the
    # model reads at most the last context of tokens, so `tokens` holds the prompts and two contexts, and when it is
    # full its oldest context is dropped. `tokens[:, i]` is the text's position `dropped + i`.
    block_size = model.config.block_size
    width = longest + min(sampling.max_new_tokens, 2 * block_size)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    dropped = 0
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens[:, :shortest], True)
    window = ContextWindow(model, len(prompts), use_cache)
    was_training = model.training
    model.eval()
    try:
        for position in range(shortest, total):
            if position - dropped == tokens.shape[1]:  # every prompt is read by now: prompts fit in `longest`
                tokens = torch.cat([tokens[:, block_size:], torch.zeros_like(tokens[:, :block_size])], dim=1)
                dropped += block_size
                window.slide(block_size)
            column = position - dropped
            sampled = sample_next_token(window.next_logits(tokens[:, :column]), sampling, seen, generator)
            reading = position < lengths
            tokens[:, column] = torch.where(reading, tokens[:, column], sampled)
            seen.scatter_(1, tokens[:, column : column + 1], True)
            is_new = ~reading & (position < lengths + sampling.max_new_tokens)
            yield [token if new else None for token, new in zip(tokens[:, column].tolist(), is_new.tolist())]
    finally:
        model.train(was_training)


class IncrementalDecoder:
    """Token ids in, text out as soon as it is whole, in constant work per token (never re-decoding all the text).

    A token decoded alone can read wrong: a byte-level token may end inside a multi-byte character, and some decoders
    change a token's text by what precedes it (SentencePiece's leading space). So each step decodes the few tokens
    already shown before the new ones and keeps only what the new ones add, once that ends in a whole character (the
    method of Hugging Face's text-generation-inference).
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context[-DECODE_CONTEXT_TOKENS:])
        self.shown = len(self.ids)
        """ids[:shown] are already text (or context); ids[shown:] wait for a whole character."""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before, text = self._decode()
        if (len(text) > len(before) and not text.endswith("\ufffd")) or len(self.ids) - self.shown > MAX_PENDING_TOKENS:
            return self._advance(before, text)
        return ""

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters shown as U+FFFD."""
        return self._advance(*self._decode())

    def _decode(self) -> tuple[str, str]:
        return self.tokenizer.decode(self.ids[: self.shown]), self.tokenizer.decode(self.ids)

    def _advance(self, before: str, text: str) -> str:
        self.ids = self.ids[self.shown :]
        self.shown = len(self.ids)
        return text[len(before) :]


class Continuation:
    """One prompt's new text as it is generated: held back while it might be the start of a stop string, and cut
    exactly before the first stop string, even one spread over several tokens. A stop token ends it unseen."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: list[str], stop_tokens: Iterable[int]):
        self.decoder = IncrementalDecoder(tokenizer, prompt)
        self.stop = stop
        self.stop_tokens = set(stop_tokens)
        self.held = ""
        self.tokens = 0
        self.finish_reason: str | None = None
        """None while generating, then "stop" (a stop string or token) or "length" (max_new_tokens reached)."""

    def add(self, token: int) -> str:
        """The text that `token` makes safe to show."""
        self.tokens += 1
        if token in self.stop_tokens:
            return self.finish("stop")
        return self._release(self.held + self.decoder.add(token), final=False)

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self._release(self.held + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        found = [i for i in (text.find(stop) for stop in self.stop) if i >= 0]
        if found:
            self.finish_reason, self.held = "stop", ""
            return text[: min(found)]
        held = 0 if final else max((self._stop_prefix_length(text, stop) for stop in self.stop), default=0)
        self.held = text[len(text) - held :] if held else ""
        return text[: len(text) - held]

    @staticmethod
    def _stop_prefix_length(text: str, stop: str) -> int:
        """Length of the longest end of `text` that begins `stop`."""
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)


@dataclass
class Piece:
    """New text of one prompt of a batch."""

    row: int
    text: str
    tokens: int
    """Tokens generated for this row so far."""
    finish_reason: str | None = None
    """Set on a row's last piece: "stop" or "length"."""


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    sampling: SampleConfig,
    stop_tokens: Iterable[int] = (),
    use_cache: bool = True,
) -> Iterator[Piece]:
    """Pieces of text as they are produced, for a batch of prompts; each row ends with a piece that has its
    finish_reason. Generation stops as soon as every row has finished."""
    rows = [Continuation(tokenizer, prompt, sampling.stop, stop_tokens) for prompt in prompts]
    for step in generate_tokens(model, prompts, sampling, use_cache):
        for index, (row, token) in enumerate(zip(rows, step)):
            if token is None or row.finish_reason:
                continue
            text = row.add(token)
            if not row.finish_reason and row.tokens == sampling.max_new_tokens:
                text += row.finish("length")
            if text or row.finish_reason:
                yield Piece(index, text, row.tokens, row.finish_reason)
        if all(row.finish_reason for row in rows):
            return
    for index, row in enumerate(rows):  # only with max_new_tokens 0
        if not row.finish_reason:
            yield Piece(index, row.finish("length"), row.tokens, row.finish_reason)
