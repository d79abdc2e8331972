"""Models: `build_model` turns a ModelConfig into a network. The language models map (B, T) ids to (B, T, vocab)
logits; the seq2seq model maps source ids and target ids to logits over the next target token."""

from __future__ import annotations

from torch import nn

from tinylm.config import ModelConfig
from tinylm.model.bigram import BigramLanguageModel
from tinylm.model.gpt import GPT
from tinylm.model.seq2seq import Seq2SeqTransformer

ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "bigram": BigramLanguageModel, "seq2seq": Seq2SeqTransformer}


def build_model(config: ModelConfig) -> nn.Module:
    if config.vocab_size is None:
        raise ValueError("model.vocab_size must be set (it is taken from the tokenizer when training)")
    return ARCHITECTURES[config.arch](config)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters (a tied matrix counted once) and how many of them are embeddings."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
