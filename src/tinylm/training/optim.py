"""Optimizers and the learning-rate schedule.

`adamw`: AdamW on every parameter; matrices decay, biases and norm gains do not (decay would only distort them).
`muon`: Muon (momentum, then Newton-Schulz orthogonalisation of each update) on the hidden matrices of the network,
the linear layers between the embedding and the output layer, and AdamW on the rest, as Keller Jordan's Muon does.
On small models Muon reaches a given loss in markedly fewer steps (BENCHMARKS.md).

Schedules: a linear warm-up, then `cosine` or `linear` decay to a floor, or `wsd` (warm-up, stable, decay), which
holds the peak and decays only at the end, so a run can be extended or branched from any checkpoint of its stable part.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylm.config import TrainConfig


def build_optimizers(model: nn.Module, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    output_layer = getattr(model, "lm_head", None)
    hidden_matrices = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not output_layer and m.weight.requires_grad
    ]
    muon_ids = {id(p) for p in hidden_matrices} if config.optimizer == "muon" else set()
    # Frozen parameters (a fine-tune's base weights) get no optimizer state.
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in muon_ids]
    # The fused kernel updates all parameters in one pass: 4.5x faster than the foreach path on CPU (BENCHMARKS.md).
    fused = device_type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        fused=fused,
        foreach=not fused,
    )
    if not muon_ids:
        return [adamw]
    muon = Muon(hidden_matrices, lr=config.muon_lr, momentum=config.muon_momentum, weight_decay=config.weight_decay)
    return [muon, adamw]


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update is orthogonalised before it is applied, for 2-D weight matrices.

    torch.optim.Muon runs its Newton-Schulz iteration in bf16 everywhere; most CPUs have no fast bf16 matmul, which
    made it slower there than the whole forward and backward pass. This one uses bf16 on GPUs and, elsewhere, an fp32
    form of the same iteration whose products are mostly of small square matrices (`orthogonalize`).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                momentum = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                momentum.lerp_(param.grad, 1 - group["momentum"])
                nesterov = param.grad.lerp(momentum, group["momentum"])
                # Orthogonal updates have unit singular values; a tall matrix needs a larger step for the same RMS.
                scale = max(1.0, param.size(0) / param.size(1)) ** 0.5
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(orthogonalize(nesterov), alpha=-group["lr"] * scale)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, gram_only: bool | None = None) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T, by Keller Jordan's quintic Newton-Schulz iteration.

    Its coefficients trade exactness for speed: singular values land in roughly [0.7, 1.2], which trains as well.
    Each step is x <- q(G) x with G = x x^T and q(G) = a + b G + c G^2. The `gram_only` form (the default off GPUs)
    iterates on G alone: q(G) commutes with G, so the next G is q(G)^2 G, and x is multiplied once, by the product of
    the q's, at the end. For an m x n matrix (m <= n) a step then costs 4 m^3 multiply-adds instead of 2 m^2 n + m^3:
    1.7-1.8x less time on the CPU recipes' matrices (BENCHMARKS.md). GPUs run the iteration in bf16, where the
    G-only form drifts (its rounding errors are never corrected by x), so they keep the plain form.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    gram_only = not matrix.is_cuda if gram_only is None else gram_only
    x = matrix.bfloat16() if matrix.is_cuda else matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)
    if gram_only:
        gram = x @ x.T
        factors = []
        for step in range(steps):
            q = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            q.diagonal().add_(a)
            factors.append(q)
            if step < steps - 1:
                gram = q @ gram @ q
        x = torch.linalg.multi_dot([*reversed(factors), x])
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every peak learning rate at `step`: a linear warm-up from 0 to 1 over warmup_steps, then
    config.schedule's way down to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_start = config.warmup_steps
    if config.schedule == "wsd":
        decay_start = max(decay_start, config.max_steps - round(config.decay_fraction * config.max_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, config.max_steps - decay_start))
    remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
    return config.min_lr_ratio + remaining * (1.0 - config.min_lr_ratio)


def build_schedulers(optimizers: list[torch.optim.Optimizer], config: TrainConfig) -> list:
    return [
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
        for optimizer in optimizers
    ]
