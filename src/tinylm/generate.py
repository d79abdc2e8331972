"""Sampling text from a language model: samplers, a KV-cached decode loop, and text streamed as it is produced.

- `sample_next_token` turns a row of logits into a token: repetition penalty, presence and frequency penalties and
  logit bias, then temperature, then the filters `keep_top_k`, `keep_top_p` and `keep_min_p`, then a draw (or the
  argmax at temperature 0).
- `generate_tokens` is the loop: a batch of prompts, one position per step, the model fed through `ContextWindow`;
  each new token comes with its log-probability when asked (`prompt_logprobs` gives the prompt's).
- `stream_text` turns each row's tokens into text pieces as they come, cut exactly before a stop string.

Log-probabilities are always the model's own distribution, the log-softmax of its logits, before any sampling setting
(penalties, bias, temperature, filters) changes it: what a scorer such as lm-eval needs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


def penalize_presence_and_frequency(
    logits: torch.Tensor, generated: torch.Tensor, sampling: SampleConfig
) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= generated[j] * frequency_penalty + (generated[j] > 0) * presence_penalty,
    where `generated` (B, vocab) counts each token in the continuation so far."""
    if not sampling.frequency_penalty and not sampling.presence_penalty:
        return logits
    counts = generated.to(logits.dtype)
    return logits - counts * sampling.frequency_penalty - (counts > 0).to(logits.dtype) * sampling.presence_penalty


def logit_bias_row(sampling: SampleConfig, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """`sampling.logit_bias` as a (vocab,) tensor to add to every row of logits; None without a bias."""
    if not sampling.logit_bias:
        return None
    check_logit_bias(sampling, vocab_size)
    bias = torch.zeros(vocab_size, device=device)
    bias[list(sampling.logit_bias)] = torch.tensor(list(sampling.logit_bias.values()), device=device)
    return bias


def check_logit_bias(sampling: SampleConfig, vocab_size: int) -> None:
    """The bias's token ids must exist in the model's vocabulary (the ranges are check_sample_config's)."""
    outside = [token for token in sampling.logit_bias if token >= vocab_size]
    if outside:
        raise TinylmError(f"logit_bias names token {outside[0]}, but the vocabulary has ids 0 to {vocab_size - 1}")


def sample_next_token(
    logits: torch.Tensor,
    sampling: SampleConfig,
    seen: torch.Tensor,
    generator: torch.Generator | None,
    generated: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab), as a (B,) tensor. `seen` (bool) marks the tokens of each row's
    text, prompt included; `generated` counts those of its continuation; `bias` is added to every row."""
    logits = penalize_repetition(logits.float(), seen, sampling.repetition_penalty)
    if generated is not None:
        logits = penalize_presence_and_frequency(logits, generated, sampling)
    if bias is not None:
        logits = logits + bias
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


@dataclass(frozen=True)
class Token:
    """A token of a text, with its log-probability when it was asked for."""

    id: int
    logprob: float | None = None
    """log P(this token | the text before it) under the model (the log-softmax of its logits); None when not asked
    for, and for a text's first token, which nothing predicts."""
    top: tuple[tuple[int, float], ...] = ()
    """The likeliest tokens at this position, (id, logprob) likeliest first, as many as asked for."""


def scored_tokens(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[Token]:
    """`tokens` (T,) with their log-probabilities under `logits` (T, vocab) and the `top` likeliest at each."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    best = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    pairs = [tuple(zip(ids, values)) for ids, values in zip(best.indices.tolist(), best.values.tolist())]
    return [Token(token, logprob, likeliest) for token, logprob, likeliest in zip(tokens.tolist(), chosen, pairs)]


def check_scorable(model: nn.Module, prompts: list[list[int]]) -> None:
    """`prompt_logprobs` scores prompts that fit in the model's context, where every token sees all before it."""
    block_size = model.config.block_size
    if max(len(p) for p in prompts) > block_size:
        raise TinylmError(f"log-probabilities of a prompt need it to fit in the model's context, {block_size} tokens")


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, prompts: list[list[int]], top: int) -> list[list[Token]]:
    """Each prompt's tokens with their log-probabilities (the first has none) and the `top` likeliest tokens at each
    position: one forward pass over the batch, padded on the right (a causal model's earlier positions never see the
    padding). A prompt must fit in the model's context, where every token sees all the tokens before it."""
    check_scorable(model, prompts)
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    batch = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(batch)[0]
    finally:
        model.train(was_training)
    return [
        [Token(prompt[0]), *scored_tokens(logits[row, : len(prompt) - 1], batch[row, 1 : len(prompt)], top)]
        for row, prompt in enumerate(prompts)
    ]


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: SampleConfig,
    use_cache: bool = True,
    top_logprobs: int | None = None,
) -> Iterator[list[Token | None]]:
    """Sample `sampling.max_new_tokens` tokens after each prompt. Each step yields one entry per prompt: the new token,
    or None while that prompt is still being read or once it has all its tokens. With `top_logprobs` (0 or more), each
    token carries its log-probability and that many likeliest tokens.

    Prompts of different lengths advance in lockstep, one position per step: a row still inside its prompt is fed its
    own next prompt token instead of a sample. So every row's t-th token sits at position t, with no padding and no
    attention mask, and learned positions and RoPE alike see exactly what they would see for that prompt alone.
    """
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    bias = logit_bias_row(sampling, vocab_size, device)
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
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens[:, :shortest], True)
    generated = torch.zeros(len(prompts), vocab_size, dtype=torch.int32, device=device)
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
            logits = window.next_logits(tokens[:, :column])
            sampled = sample_next_token(logits, sampling, seen, generator, generated, bias)
            reading = position < lengths
            tokens[:, column] = torch.where(reading, tokens[:, column], sampled)
            seen.scatter_(1, tokens[:, column : column + 1], True)
            is_new = ~reading & (position < lengths + sampling.max_new_tokens)
            generated.scatter_add_(1, tokens[:, column : column + 1], is_new[:, None].to(generated.dtype))
            if top_logprobs is None:
                step = [Token(token) for token in tokens[:, column].tolist()]
            else:
                step = scored_tokens(logits, tokens[:, column], top_logprobs)
            yield [token if new else None for token, new in zip(step, is_new.tolist())]
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
    logprobs: list[Token] = field(default_factory=list)
    """The row's tokens generated since its previous piece (a stop token too, though it adds no text, as OpenAI's
    logprobs show it), with their log-probabilities when they were asked for."""


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    sampling: SampleConfig,
    stop_tokens: Iterable[int] = (),
    use_cache: bool = True,
    top_logprobs: int | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Piece]:
    """Pieces of text as they are produced, for a batch of prompts; each row ends with a piece that has its
    finish_reason. Generation stops as soon as every row has finished, or without a last piece when `cancel` is set
    (it is looked at before every token)."""
    rows = [Continuation(tokenizer, prompt, sampling.stop, stop_tokens) for prompt in prompts]
    since_last_piece: list[list[Token]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, sampling, use_cache, top_logprobs):
        if cancel is not None and cancel.is_set():
            return
        for index, (row, token) in enumerate(zip(rows, step)):
            if token is None or row.finish_reason:
                continue
            text = row.add(token.id)
            if not row.finish_reason and row.tokens == sampling.max_new_tokens:
                text += row.finish("length")
            since_last_piece[index].append(token)
            if text or row.finish_reason:
                yield Piece(index, text, row.tokens, row.finish_reason, since_last_piece[index])
                since_last_piece[index] = []
        if all(row.finish_reason for row in rows):
            return
    for index, row in enumerate(rows):  # only with max_new_tokens 0
        if not row.finish_reason:
            yield Piece(index, row.finish("length"), row.tokens, row.finish_reason)
