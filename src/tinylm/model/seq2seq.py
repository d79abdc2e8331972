"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), readable top to bottom.

source ids -> embedding * sqrt(d) + sinusoidal positions -> n_layer x EncoderLayer -> memory
target ids -> embedding * sqrt(d) + sinusoidal positions -> n_layer x DecoderLayer(memory) -> logits

An EncoderLayer is self-attention over the source, then a feed-forward network. A DecoderLayer is causal
self-attention over the target so far, then cross-attention from the target to the encoder's memory, then a
feed-forward network. As in the paper, one embedding matrix serves source and target (one shared vocabulary) and,
with `tie_embeddings`, the output layer too.

Normalisation is post-norm as in the paper: x = norm(x + sublayer(x)). Post-norm is known to need a learning-rate
warm-up in deep stacks (pre-norm, as in gpt.py, does not); these models are two layers deep, train stably with a short
warm-up, and so stay the paper's.

Padding: sequences in a batch are padded with PAD (id 0) at their end. Source padding is masked out of every
attention over the source. Target padding needs no mask: it sits after the real tokens, and causal attention never
lets a real token see a later position; the loss ignores the padded positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig

# The special tokens every sequence-to-sequence vocabulary starts with; ordinary tokens come after them.
PAD, BOS, EOS = 0, 1, 2


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """(length, width): PE[pos, 2i] = sin(pos / 10000^(2i/width)), PE[pos, 2i+1] = cos(same). Fixed, not learned:
    each offset is a rotation of these sines and cosines, which makes relative positions easy to attend to."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class MultiHeadAttention(nn.Module):
    """Queries from `x`, keys and values from `memory` (memory is x itself for self-attention)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.key_value = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from x (B, T, C) to memory (B, S, C). memory_mask (B, S) is True where memory is real (not PAD).
        With need_weights, also return the attention weights (B, n_head, T, S)."""
        batch, time, width = x.shape
        head_dim = width // self.n_head
        q = self.query(x).view(batch, time, self.n_head, head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.key_value(memory).view(batch, -1, 2, self.n_head, head_dim).permute(2, 0, 3, 1, 4)  # (B, H, S, D)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # broadcast over heads and queries
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            # The same computation spelled out, for when the weights themselves are wanted (to draw them).
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            if causal:
                scores = scores.masked_fill(
                    torch.ones(time, time, dtype=torch.bool, device=x.device).triu(1), -math.inf
                )
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            y = weights @ v
        else:
            # One fused kernel (flash or memory-efficient attention where the device has it); it returns no weights.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
            weights = None
        return self.proj(y.transpose(1, 2).reshape(batch, time, width)), weights


class FeedForward(nn.Module):
    """The paper's position-wise network: two linear layers with a ReLU between, 4x wider inside."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, x, source_mask)[0]))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross_attn = MultiHeadAttention(config)
        self.cross_attn_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new target states, and the cross-attention weights (B, n_head, T, S) when asked for."""
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, x, causal=True)[0]))
        attended, weights = self.cross_attn(x, memory, source_mask, need_weights=need_weights)
        x = self.cross_attn_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x))), weights


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.register_buffer("positions", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Xavier-uniform init as in the paper's reference code; embeddings ~ N(0, 1/C) so that after the sqrt(C)
        # scaling below they have unit variance, on the same scale as the positions they are added to.
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        nn.init.normal_(self.token_embedding.weight, std=config.n_embd**-0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence of {time} tokens is longer than block_size {self.config.block_size}")
        return self.dropout(self.token_embedding(tokens) * math.sqrt(self.config.n_embd) + self.positions[:time])

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, S, C) for source ids (B, S), and the source mask (B, S): True where the source is not PAD."""
        source_mask = source != PAD
        x = self.embed(source)
        for layer in self.encoder:
            x = layer(x, source_mask)
        return x, source_mask

    def decode(
        self, target: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Next-token logits (B, T, vocab) at every target position; with need_weights, also each decoder layer's
        cross-attention weights (B, n_head, T, S)."""
        x = self.embed(target)
        cross_weights = []
        for layer in self.decoder:
            x, weights = layer(x, memory, source_mask, need_weights)
            cross_weights.append(weights)
        return self.lm_head(x), cross_weights if need_weights else None

    def forward(
        self,
        source: torch.Tensor,
        target_input: torch.Tensor,
        target_output: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for the target input (BOS y1 ... yn); with the target output (y1 ... yn EOS), also
        the mean cross-entropy over its non-PAD tokens. label_smoothing spreads that share of each target's
        probability evenly over the vocabulary, as the paper does (0.1 there) so the model is never sure."""
        memory, source_mask = self.encode(source)
        logits, _ = self.decode(target_input, memory, source_mask)
        if target_output is None:
            return logits, None
        loss = F.cross_entropy(
            logits.flatten(0, 1), target_output.flatten(), ignore_index=PAD, label_smoothing=label_smoothing
        )
        return logits, loss

    @torch.inference_mode()
    def greedy_decode(self, source: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """For each source row, the likeliest token at each step until EOS (or max_new_tokens), EOS left out."""
        was_training = self.training
        self.eval()
        memory, source_mask = self.encode(source)
        target = torch.full((source.shape[0], 1), BOS, dtype=torch.long, device=source.device)
        finished = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        for _ in range(min(max_new_tokens, self.config.block_size - 1)):  # BOS + answer fit the context
            logits, _ = self.decode(target, memory, source_mask)
            next_token = logits[:, -1].argmax(dim=-1).masked_fill(finished, PAD)
            target = torch.cat([target, next_token[:, None]], dim=1)
            finished |= next_token == EOS
            if finished.all():
                break
        self.train(was_training)
        outputs = []
        for row in target[:, 1:].tolist():
            outputs.append(row[: row.index(EOS)] if EOS in row else row)
        return outputs
