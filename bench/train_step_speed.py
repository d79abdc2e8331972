"""Training tokens per second: tinylm's training step against a nanoGPT-style step, same model, same batch, one process.

The configuration is nanoGPT's Tiny Shakespeare CPU command (4 layers, 4 heads, width 128, context 64, batch 12,
no dropout, no bias, AdamW lr 1e-3, beta2 0.99, weight decay 0.1, gradient clipping at 1.0). The reference below is
written from nanoGPT's README and model description in plain PyTorch: its model (LayerNorm without bias, causal
attention through scaled_dot_product_attention, GELU MLP, tied embeddings, GPT-2 init), its `get_batch` (a fresh
memmap per batch, one slice per row), and its step (loss.backward(), clip_grad_norm_, AdamW as torch picks it on CPU
(the for-loop implementation; nanoGPT asks for fused only on CUDA), zero_grad(set_to_none=True), loss.item()).
tinylm's side is `Engine.train_step`, the step `tinylm train` runs.

Both run in this one process, in alternating windows of steps, so that the machine's load hits both alike. Each window
is timed twice: wall clock, and the CPU time of this process (time.process_time), which on a machine shared with other
jobs counts only the work this process did. The ratio of the median tokens per CPU-second is the figure to quote on a
busy machine; on a quiet one the two agree.

    OMP_NUM_THREADS=1 python bench/train_step_speed.py [--threads 1] [--windows 8] [--steps-per-window 50]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tinylm
from tinylm.training.distributed import start_processes
from tinylm.training.engine import Engine
from tinylm.training.tasks.pretrain import Pretraining

BLOCK_SIZE, BATCH_SIZE, N_LAYER, N_HEAD, N_EMBD = 64, 12, 4, 4, 128


# --- the nanoGPT-style reference ------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own, as torch's had no bias=False when it was written)."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class ReferenceAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        k = k.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        q = q.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        v = v.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class ReferenceMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ReferenceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = LayerNorm(N_EMBD, bias=False)
        self.attn = ReferenceAttention()
        self.ln_2 = LayerNorm(N_EMBD, bias=False)
        self.mlp = ReferenceMLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.wpe = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.h = nn.ModuleList(ReferenceBlock() for _ in range(N_LAYER))
        self.ln_f = LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class ReferenceTrainer:
    """nanoGPT's train.py loop body at gradient_accumulation_steps 1 on CPU (no autocast; the CUDA GradScaler off)."""

    def __init__(self, train_bin: Path, vocab_size: int):
        self.train_bin = train_bin
        torch.manual_seed(1337)
        self.model = ReferenceGPT(vocab_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
        self.iter = 0
        self.x, self.y = self.get_batch()

    def get_batch(self):
        data = np.memmap(self.train_bin, dtype=np.uint16, mode="r")  # recreated every batch, as nanoGPT does
        ix = torch.randint(len(data) - BLOCK_SIZE, (BATCH_SIZE,))
        x = torch.stack([torch.from_numpy(data[i : i + BLOCK_SIZE].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + BLOCK_SIZE].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(self, it: int) -> float:
        warmup, decay_iters, lr, min_lr = 100, 2000, 1e-3, 1e-4
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / (decay_iters - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def train_step(self) -> float:
        lr = self.get_lr(self.iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, loss = self.model(self.x, self.y)
        self.x, self.y = self.get_batch()  # prefetch the next batch, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        return loss.item()


# --- tinylm ------------------------------------------------------------


NANOGPT_CPU_CONFIG = {
    "data.source": "tinyshakespeare",
    "model.block_size": BLOCK_SIZE,
    "model.n_layer": N_LAYER,
    "model.n_head": N_HEAD,
    "model.n_embd": N_EMBD,
    "model.dropout": 0.0,
    "model.bias": False,
    "train.batch_size": BATCH_SIZE,
    "train.learning_rate": 1e-3,
    "train.beta2": 0.99,
    "train.device": "cpu",
    "train.eval_batches": 1,
}
"""nanoGPT's Tiny Shakespeare CPU command as tinylm config keys."""


def tinylm_loop(run_dir: Path, extra: dict) -> tuple[Engine, Path, int]:
    """The engine `tinylm train` runs, set up for pretraining on nanoGPT's config (its run folder claimed)."""
    overrides = {**NANOGPT_CPU_CONFIG, "train.max_steps": 2000, "out": str(run_dir), **extra}
    task = Pretraining(tinylm.load_config(None, overrides))
    engine = Engine(task, start_processes("cpu"), overwrite=False, resume=False)
    engine.model.train()
    data_folder = Path(task.data_folder)
    return engine, data_folder / "train_0000.bin", task.tokenizer.vocab_size


def tokens_per_s(step, steps: int) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second over `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    tokens = steps * BATCH_SIZE * BLOCK_SIZE
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=8, help="Alternating timing windows per side.")
    parser.add_argument("--steps-per-window", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="torch.compile tinylm's model (--train.compile).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as workdir:
        loop, train_bin, vocab_size = tinylm_loop(Path(workdir) / "run", {"train.compile": args.compile})
        reference = ReferenceTrainer(train_bin, vocab_size)
        ours = sum(p.numel() for p in loop.model.parameters())
        theirs = sum(p.numel() for p in reference.model.parameters())
        assert ours == theirs, (ours, theirs)
        sides = {"nanoGPT-style": reference.train_step, "tinylm": loop.train_step}
        for step in sides.values():  # warm up: first-call allocations, the compile when asked
            for _ in range(10):
                step()
        speeds: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.windows):
            for name, step in sides.items():
                speeds[name].append(tokens_per_s(step, args.steps_per_window))
    print(f"{ours:,} parameters, {BATCH_SIZE} x {BLOCK_SIZE} tokens per step")
    print(f"{'':<14}{'tokens/s (wall)':>18}{'tokens per CPU-s':>18}")
    medians = {}
    for name, values in speeds.items():
        medians[name] = [statistics.median(column) for column in zip(*values)]
        print(f"{name:<14}{medians[name][0]:>18,.0f}{medians[name][1]:>18,.0f}")
    wall, cpu = (ours / theirs for ours, theirs in zip(medians["tinylm"], medians["nanoGPT-style"]))
    print(f"tinylm / nanoGPT-style: {wall:.2f}x wall clock, {cpu:.2f}x per CPU-second")


if __name__ == "__main__":
    main()
