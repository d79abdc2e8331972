"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylm.config import TrainConfig


def build_adamw(model: nn.Module, config: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW that decays matrices (linear weights and embeddings) but not biases or norm gains.

    Decay pulls a weight towards zero: that regularises a projection, but would only distort a bias or a gain.
    """
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is one launch for all parameters on GPUs; on CPU the default foreach path is the fast one.
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=device_type == "cuda"
    )


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 to the peak over warmup_steps, then a cosine decay to peak * min_lr_ratio at max_steps."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
