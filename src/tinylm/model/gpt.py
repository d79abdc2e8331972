"""A decoder-only Transformer language model, readable top to bottom: GPT-2 by default, Llama by config flags.

tokens -> token embedding (+ learned position embedding) -> n_layer x Block -> norm -> logits over the vocabulary

Each Block is pre-norm: x + attention(norm(x)), then x + mlp(norm(x)). Attention is causal: position t only sees
positions <= t, so the logits at t never depend on later tokens.

The flags, each a ModelConfig field: positions learned | rope, norm layernorm | rmsnorm, mlp gelu | gelu_tanh | swiglu |
relu2, n_kv_head (grouped- and multi-query attention), qk_norm, bias, tie_embeddings, dropout; and the speedrun
community's: attention_window with attention_pattern (sliding-window layers), value_embeddings, logit_softcap,
zero_init_projections. GPT-2 is every default; Llama is rope + rmsnorm + swiglu (+ n_kv_head) without biases. A KVCache
makes generation one position of work per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.model.kv_cache import KVCache


def make_norm(config: ModelConfig, width: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """RoPE: turns each pair of a head's dims by an angle proportional to the position, so q . k depends only on how
    far apart two tokens are. Pairs are (i, i + head_dim/2), the Hugging Face Llama layout, so Llama checkpoints load
    without permuting their weights. The tables are recomputed, not saved (persistent=False)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        frequencies = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), frequencies)
        angles = torch.cat([angles, angles], dim=-1)  # (positions, head_dim): both halves of a pair share an angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (length, head_dim) for positions start .. start + length - 1."""
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for each pair, in fp32."""
    first, second = x.float().chunk(2, dim=-1)
    rotated_by_90_degrees = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated_by_90_degrees * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.window = config.layer_window(layer_index)
        # Per-token vectors added to the values: a lookup instead of a matrix multiply.
        kv_width = self.n_kv_head * self.head_dim
        self.value_embedding = nn.Embedding(config.vocab_size, kv_width) if config.value_embeddings else None
        self.dropout = config.dropout
        # One matrix makes q (n_head heads), k and v (n_kv_head heads each); fewer k/v heads shrink the KV cache.
        qkv_width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
        tokens: torch.Tensor | None = None,
        same_document: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`tokens`, the ids behind x, are read by value embeddings only; `same_document` (B, 1, T, T), True where
        two positions are in one document, keeps attention inside documents (data.packing: bos)."""
        batch, time, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, *2 * [self.n_kv_head * self.head_dim]], dim=-1)
        if self.value_embedding is not None:
            v = v + self.value_embedding(tokens)
        q = q.view(batch, time, self.n_head, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer_index, k, v)
        # The new tokens sit after `past` cached ones: new token i sees keys 0 .. past + i. With nothing cached that
        # is the plain causal mask (the fast path training takes); one new token sees every key, so it needs none.
        past = k.shape[2] - time
        mask = None
        if past and time > 1:
            mask = torch.ones(time, past + time, dtype=torch.bool, device=x.device).tril(past)
        if (self.window is not None and past + time > self.window) or same_document is not None:
            causal = torch.ones(time, past + time, dtype=torch.bool, device=x.device).tril(past)
            if self.window is not None:  # a sliding layer also forgets the oldest keys
                causal = causal & ~causal.tril(past - self.window)
            mask = causal if same_document is None else causal & same_document
        # One fused kernel for softmax(q k^T / sqrt(d) + mask) v: flash attention where the device has it.
        # enable_gqa lets each k/v head serve n_head / n_kv_head consecutive query heads without copying it.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=past == 0 and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).reshape(batch, time, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """gelu (or gelu_tanh): proj(gelu(fc(x))). swiglu: proj(silu(gate(x)) * up(x)), a learned gate per hidden unit.
    relu2: proj(relu(fc(x))^2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_width
        self.kind = config.mlp
        self.gelu_approximation = "tanh" if config.mlp == "gelu_tanh" else "none"
        if self.kind == "swiglu":
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
            self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        else:
            self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            hidden = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "relu2":
            hidden = F.relu(self.fc(x)).square()
        else:
            hidden = F.gelu(self.fc(x), approximate=self.gelu_approximation)
        return self.dropout(self.proj(hidden))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
        tokens: torch.Tensor | None = None,
        same_document: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, kv_cache, tokens, same_document)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        learned = config.positions == "learned"
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd) if learned else None
        self.rotary = None if learned else RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One matrix both reads tokens in and scores them out: fewer parameters, and it trains better when small.
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's init for every matrix, the SwiGLU ones too. Each block adds two residual projections to the stream;
        # scaling their init by 1/sqrt(2 * n_layer) keeps the stream's variance the same whatever the depth.
        # Norms keep torch's init: gain 1, bias 0. zero_init_projections starts those projections at zero instead.
        if isinstance(module, nn.Linear):
            residual = hasattr(module, "is_residual_projection")
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=0.0 if residual and self.config.zero_init_projections else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_kv_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to block_size positions (default: the weights' device and
        dtype)."""
        weight = self.token_embedding.weight
        c = self.config
        return KVCache(
            batch_size, c.block_size, c.n_layer, c.kv_heads, c.head_dim, device or weight.device, dtype or weight.dtype
        )

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T); with targets (B, T), also the mean cross-entropy in nats
        (targets -1 predict nothing).

        With a kv_cache the tokens continue the cached ones: they take the next positions and attend to everything
        cached before them, and the cache grows by T. `documents` (B, T) numbers the documents packed in each row:
        a position attends only to earlier positions of its own document.
        """
        time = tokens.shape[1]
        if kv_cache is not None:
            start = kv_cache.reserve(time)
        elif time > self.config.block_size:
            raise ValueError(f"sequence of {time} tokens is longer than block_size {self.config.block_size}")
        else:
            start = 0
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(start, start + time, device=tokens.device))
        rotary = None if self.rotary is None else self.rotary(start, time)
        x = self.dropout(x)
        same_document = None if documents is None else (documents[:, None, :, None] == documents[:, None, None, :])
        for block in self.blocks:
            x = block(x, rotary, kv_cache, tokens, same_document)
        logits = self.lm_head(self.final_norm(x))
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss
