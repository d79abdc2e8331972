"""Model presets as data: a named set of `ModelConfig` fields. A recipe picks one with `model.preset`, and any model
key it sets besides wins over the preset."""

from __future__ import annotations

from typing import Any

_GPT2_BPE = {"vocab_size": 50257}  # GPT-2's byte-level BPE (tokenizer gpt2), also GPT-Neo's
_TINYSTORIES = {**_GPT2_BPE, "block_size": 2048, "n_head": 16}  # the paper's GPT-Neo models, learned positions
_LLAMA = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": True}
_LLAMA2_C = {**_LLAMA, "vocab_size": 32000}  # Karpathy's llama2.c TinyStories models (Llama 2's tokenizer)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The teaching baseline: each token looks up the logits of the next one; no context at all.
    "bigram": {"arch": "bigram", "n_layer": 0, "n_head": 1, "n_embd": 0, "tie_embeddings": False},
    # nanoGPT's config/train_shakespeare_char.py.
    "nanogpt-shakespeare-char": {
        "arch": "gpt",
        "block_size": 256,
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "dropout": 0.2,
        "bias": False,
    },
    # The TinyStories paper's models (Eldan and Li 2023; roneneldan/TinyStories-*), as GPT-2-style blocks: GPT-Neo's
    # alternating local attention and bias-free q/k/v are not modelled. The names follow the paper and are about the
    # size without the 50257 x n_embd embedding; with it counted (once, tied) the totals are larger.
    "tinystories-1m": {**_TINYSTORIES, "n_layer": 8, "n_embd": 64},
    "tinystories-3m": {**_TINYSTORIES, "n_layer": 8, "n_embd": 128},
    "tinystories-8m": {**_TINYSTORIES, "n_layer": 8, "n_embd": 256},
    "tinystories-28m": {**_TINYSTORIES, "n_layer": 8, "n_embd": 512},
    "tinystories-33m": {**_TINYSTORIES, "n_layer": 4, "n_embd": 768},
    # A small GPT-2-style model for GPT-2 BPE text that trains on a laptop: most of its weights are the embedding.
    "slm-15m": {**_GPT2_BPE, "block_size": 256, "n_layer": 6, "n_head": 7, "n_embd": 224},
    # GPT-2 style with grouped-query attention (8 query heads share 4 k/v heads) and GPT-Neo's vocabulary and context.
    "tinygpt-61m": {**_GPT2_BPE, "block_size": 2048, "n_layer": 12, "n_head": 8, "n_kv_head": 4, "n_embd": 512},
    # GPT-2 small (Radford et al. 2019).
    "gpt2-124m": {**_GPT2_BPE, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "bias": True},
    # llama2.c's stories15M / 42M / 110M: multi-head (n_kv_head = n_head) as they were trained, so their weights fit.
    "llama-15m": {**_LLAMA2_C, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 288, "mlp_hidden_size": 768},
    "llama-42m": {**_LLAMA2_C, "block_size": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "mlp_hidden_size": 1376},
    "llama-110m": {
        **_LLAMA2_C,
        "block_size": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "mlp_hidden_size": 2048,
    },
    # HuggingFaceTB/SmolLM2-135M: Llama with grouped-query attention (9 query heads, 3 k/v heads).
    "smollm2-135m": {
        **_LLAMA,
        "vocab_size": 49152,
        "block_size": 2048,
        "n_layer": 30,
        "n_head": 9,
        "n_kv_head": 3,
        "n_embd": 576,
        "mlp_hidden_size": 1536,
        "rope_theta": 100000.0,
        "norm_eps": 1e-5,
    },
}

# Each preset's parameters, tied matrices counted once (tests/test_presets.py builds every preset and checks).
# Presets that take their vocabulary from the tokenizer are counted with Tiny Shakespeare's 65 characters.
PRESET_PARAMETERS: dict[str, int] = {
    "bigram": 4_225,
    "nanogpt-shakespeare-char": 10_745_088,
    "tinystories-1m": 3_747_520,
    "tinystories-3m": 8_281_472,
    "tinystories-8m": 19_708_672,
    "tinystories-28m": 52_000_256,
    "tinystories-33m": 68_523_264,
    "slm-15m": 14_945_504,
    "tinygpt-61m": 61_457_920,
    "gpt2-124m": 124_439_808,
    "llama-15m": 15_191_712,
    "llama-42m": 41_689_600,
    "llama-110m": 109_529_856,
    "smollm2-135m": 134_515_008,
}
