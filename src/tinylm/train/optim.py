"""Optimizers and the learning-rate schedule.

`adamw`: AdamW on every parameter; matrices decay, biases and norm gains do not (decay would only distort them).
`muon`: Muon (momentum, then Newton-Schulz orthogonalisation of each update) on the hidden matrices of the network,
the linear layers between the embedding and the output layer, and AdamW on the rest, as in the Muon paper's recipe.
On small models Muon reaches a given loss in markedly fewer steps (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylm.config import TrainConfig


def build_optimizers(model: nn.Module, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    output_layer = getattr(model, "lm_head", None)
    hidden_matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not output_layer]
    muon_ids = {id(p) for p in hidden_matrices} if config.optimizer == "muon" else set()
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    # The fused kernel is one launch for all parameters on GPUs; on CPU the default foreach path is the fast one.
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        fused=device_type == "cuda",
    )
    if not muon_ids:
        return [adamw]
    muon = torch.optim.Muon(
        hidden_matrices,
        lr=config.muon_lr,
        momentum=config.muon_momentum,
        weight_decay=config.weight_decay,
        adjust_lr_fn="original",  # scale by sqrt(max(1, rows / cols)), as Keller Jordan's Muon does
    )
    return [muon, adamw]


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every peak learning rate at `step`: a linear warm-up from 0 to 1 over warmup_steps, then a
    cosine decay to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - config.min_lr_ratio)


def build_schedulers(optimizers: list[torch.optim.Optimizer], config: TrainConfig) -> list:
    return [
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
        for optimizer in optimizers
    ]
