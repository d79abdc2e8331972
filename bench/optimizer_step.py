"""Milliseconds per optimizer step on the default recipe's model: AdamW (foreach, fused), tinylm's Muon, torch's Muon.

Muon's orthogonalisation is also timed alone in both forms of `orthogonalize` (plain and G-only, both fp32).

    python bench/optimizer_step.py [--recipe configs/shakespeare-char.yaml] [--rounds 3]

Each round times every optimizer on the same gradients, one after another, so that drift in the machine's speed hits
all of them alike. The forward and backward pass of one batch is timed beside them for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinylm.model import build_model
from tinylm.recipes import load_config
from tinylm.training.optim import Muon, orthogonalize


def milliseconds(step, repeats: int = 100) -> float:
    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/shakespeare-char.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.recipe, {"model.vocab_size": 66})
    model = build_model(config.model)
    batch = torch.randint(0, 66, (config.train.batch_size, config.model.block_size))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(batch, batch)[1].backward()

    forward_backward()
    params = list(model.parameters())
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    # Tiny learning rates: the weights barely move, so every round times the same work.
    optimizers = {
        "adamw foreach": torch.optim.AdamW(params, lr=1e-9, foreach=True),
        "adamw fused": torch.optim.AdamW(params, lr=1e-9, fused=True),
        "muon (hidden matrices)": Muon(matrices, lr=1e-9),
        "torch.optim.Muon (bf16)": torch.optim.Muon(matrices, lr=1e-9),
    }
    # Muon's orthogonalisation alone, in the two forms of `orthogonalize`, on the same gradients.
    iterations = {
        f"orthogonalize, {name}": lambda only=gram_only: [orthogonalize(m.grad, gram_only=only) for m in matrices]
        for name, gram_only in (("plain", False), ("G-only", True))
    }
    timings: dict[str, list[float]] = {name: [] for name in ["forward+backward", *optimizers, *iterations]}
    for _ in range(args.rounds):
        timings["forward+backward"].append(milliseconds(forward_backward, repeats=50))
        for name, optimizer in optimizers.items():
            timings[name].append(milliseconds(optimizer.step))
        for name, iteration in iterations.items():
            timings[name].append(milliseconds(iteration))
    print(
        f"{args.recipe}: {sum(p.numel() for p in params):,} parameters, batch {tuple(batch.shape)}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name, values in timings.items():
        print(f"{name:<24}{statistics.median(values):8.2f} ms  (rounds: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
