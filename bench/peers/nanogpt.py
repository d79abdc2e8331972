"""tinylm against the real nanoGPT on Tiny Shakespeare (characters), side by side in one run, on this machine.

nanoGPT runs from a local checkout the user names (nothing is fetched at run time): its own `prepare.py` and
`train.py` with the CPU command of its README, in a scratch copy of the checkout so the checkout stays clean. Its
input.txt is the one tinylm reads (the download, or the offline mirror), so both train on the same characters with the
same 90/10 split. Then, in the same run:

1. time to quality: nanoGPT's recipe (wall time of `train.py`), and `configs/shakespeare-char.yaml` for each seed
   (wall time of `tinylm train`); every model is scored on the whole validation split, each at its own context, in
   windows that do not overlap (nanoGPT's checkpoint with its own model.py). The goals: val loss <= 1.876 for every
   seed, in <= 0.33x nanoGPT's wall time.
2. speed at nanoGPT's exact CPU config (4 layers, 4 heads, width 128, context 64, 12 rows): training tokens/s of
   nanoGPT's `train.py` against `tinylm train` with the same shapes and schedule (median step time, evaluation steps
   left out), each with the model FLOPs utilisation against this machine's measured fp32 matmul peak, and a profile
   of tinylm's step there: the share of its wall time in matmuls, attention, the optimizer, other operators and
   outside any operator.

    python bench/peers/nanogpt.py --checkout build/peers/nanoGPT [--seeds 1 2 3] [--threads 2]

Data preparation is done before the clocks start, for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TARGET_VAL_LOSS = 1.876
TARGET_TIME_RATIO = 0.33
README_CPU_COMMAND = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
TINYLM_AT_NANOGPT_CONFIG = {
    "model.block_size": 64,
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.dropout": 0.0,
    "model.bias": "false",
    "train.optimizer": "adamw",
    "train.batch_size": 12,
    "train.max_steps": 2000,
    "train.learning_rate": 1e-3,
    "train.warmup_steps": 100,
    "train.min_lr_ratio": 0.1,
    "train.beta2": 0.99,
    "train.eval_interval": 250,
    "train.eval_batches": 20,
    "train.grad_clip": 1.0,
    "train.weight_decay": 0.1,
}
ITERATION = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """This machine's fp32 matmul speed (FLOP/s) at the threads torch uses: the best of a few timed products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def training_flops_per_token(n_layer: int, n_embd: int, block_size: int, vocab_size: int) -> float:
    """6 N + 12 L C T per token (PaLM's appendix B; nanoGPT's estimate_mfu counts the same), N without positions."""
    parameters = 12 * n_layer * n_embd**2 + vocab_size * n_embd
    return 6 * parameters + 12 * n_layer * n_embd * block_size


def run_nanogpt(checkout: Path, workdir: Path, input_txt: Path, threads: int) -> dict:
    copy = workdir / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    data = copy / "data" / "shakespeare_char"
    shutil.copyfile(input_txt, data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    log = subprocess.run(
        [sys.executable, "train.py", *README_CPU_COMMAND], cwd=copy, env=env, check=True, capture_output=True, text=True
    ).stdout
    wall_s = time.perf_counter() - began
    step_ms = [float(m[2]) for line in log.splitlines() if (m := ITERATION.match(line)) and int(m[1]) % 250 != 0]
    return {
        "recipe": "nanoGPT train.py (README CPU command)",
        "wall_s": wall_s,
        "tokens_per_s": 12 * 64 / (statistics.median(step_ms) / 1000),
        "val_loss_full": nanogpt_val_loss(copy, data / "val.bin"),
    }


@torch.no_grad()
def nanogpt_val_loss(copy: Path, val_bin: Path) -> float:
    """The mean loss of nanoGPT's saved checkpoint over its whole val split, in windows of its context that do not
    overlap, with its own model code."""
    sys.path.insert(0, str(copy))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py

        saved = torch.load(copy / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=False)
        model = GPT(GPTConfig(**saved["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
        model.eval()
    finally:
        sys.path.remove(str(copy))
        sys.modules.pop("model", None)
    tokens = torch.from_numpy(np.fromfile(val_bin, dtype=np.uint16).astype(np.int64))
    context = saved["model_args"]["block_size"]
    total, count = 0.0, 0
    for begin in range(0, len(tokens) - 1, context):
        window = tokens[begin : begin + context + 1]
        _, loss = model(window[None, :-1], window[None, 1:])
        total += loss.item() * (len(window) - 1)
        count += len(window) - 1
    return total / count


def run_tinylm(recipe: str, overrides: dict, workdir: Path, label: str, threads: int) -> dict:
    """`tinylm train RECIPE` with `overrides` (timed), then `tinylm eval` of its best weights on the whole val split."""
    out = workdir / re.sub(r"\W+", "-", label)  # a folder name, whatever the label says
    settings = [part for key, value in overrides.items() for part in (f"--{key}", str(value))]
    command = [sys.executable, "-m", "tinylm", "train", recipe, "--out", str(out), "--sample.max_new_tokens", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    subprocess.run([*command, *settings], env=env, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - began
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = subprocess.run(
        [sys.executable, "-m", "tinylm", "eval", str(out), "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return {
        "recipe": label,
        "wall_s": wall_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r),
        "val_loss_full": json.loads(scored.stdout)["val"]["loss"],
        "val_bpb": json.loads(scored.stdout)["val"]["bpb"],
    }


OPERATOR_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "optimizer": ("adam",),
}
"""Profiler operator names of each kind of work in a CPU training step; an operator matching none is `other`."""


def step_profile(recipe: str, overrides: dict, workdir: Path, steps: int = 30) -> dict:
    """Where one tinylm training step's wall time goes at `overrides`, in this process: each kind of operator's share
    (self time), and the rest, outside any operator (Python, the autograd engine's bookkeeping, the data batch).
    The profiler's own overhead inflates that rest a little."""
    from tinylm.recipes import load_config
    from tinylm.training.distributed import start_processes
    from tinylm.training.engine import Engine
    from tinylm.training.tasks.pretrain import Pretraining

    settings = {**overrides, "out": str(workdir / "profiled")}
    engine = Engine(Pretraining(load_config(recipe, settings)), start_processes("cpu"), overwrite=False, resume=False)
    engine.model.train()
    for _ in range(10):
        engine.train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        began = time.perf_counter()
        for _ in range(steps):
            engine.train_step()
        wall_us = (time.perf_counter() - began) * 1e6
    shares = dict.fromkeys([*OPERATOR_KINDS, "other operators"], 0.0)
    for event in profile.key_averages():
        kind = next((k for k, marks in OPERATOR_KINDS.items() if any(m in event.key for m in marks)), None)
        shares[kind or "other operators"] += event.self_cpu_time_total / wall_us
    shares["outside operators"] = 1 - sum(shares.values())
    return {"step_ms": wall_us / steps / 1e3, "shares": {kind: round(share, 3) for kind, share in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, required=True, help="A local clone of karpathy/nanoGPT.")
    parser.add_argument("--recipe", default="configs/shakespeare-char.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not (args.checkout / "train.py").is_file():
        sys.exit(f"{args.checkout} is not a nanoGPT checkout (no train.py); clone karpathy/nanoGPT there")
    torch.set_num_threads(args.threads)

    from tinylm.data.prepare import prepare
    from tinylm.data.sources import SOURCES, fetch
    from tinylm.recipes import load_config

    source = SOURCES["tinyshakespeare"]
    input_txt = fetch(source.folder, source.files[0])
    prepare(load_config(args.recipe).data)  # tinylm's shards, before the clock, as nanoGPT's prepare.py is
    peak = matmul_peak_flops()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    flops = training_flops_per_token(4, 128, 64, 65)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        threads = args.threads
        nanogpt = run_nanogpt(args.checkout, workdir, input_txt, threads)
        same_config = run_tinylm(
            args.recipe, TINYLM_AT_NANOGPT_CONFIG, workdir, "tinylm at nanoGPT's config", args.threads
        )
        rows += [nanogpt, same_config]
        profiled = step_profile(args.recipe, TINYLM_AT_NANOGPT_CONFIG, workdir)
        for seed in args.seeds:
            rows.append(
                run_tinylm(args.recipe, {"train.seed": seed}, workdir, f"{args.recipe} seed {seed}", args.threads)
            )
    print(f"\n{'recipe':<44}{'wall s':>8}{'tok/s':>9}{'MFU':>7}{'val loss':>10}")
    for row in rows:
        mfu = row["tokens_per_s"] * flops / peak if row in (nanogpt, same_config) else None
        print(
            f"{row['recipe']:<44}{row['wall_s']:>8.1f}{row['tokens_per_s']:>9,.0f}"
            f"{f'{mfu:.1%}' if mfu else '':>7}{row['val_loss_full']:>10.4f}"
        )
    recipe_rows = rows[2:]
    ratio = max(r["wall_s"] for r in recipe_rows) / nanogpt["wall_s"]
    worst = max(r["val_loss_full"] for r in recipe_rows)
    print(
        f"\nslowest seed's wall time / nanoGPT's: {ratio:.2f}x (goal <= {TARGET_TIME_RATIO}); "
        f"worst val loss {worst:.4f} (goal <= {TARGET_VAL_LOSS}); tokens/s at nanoGPT's config: "
        f"{same_config['tokens_per_s'] / nanogpt['tokens_per_s']:.2f}x nanoGPT's"
    )
    shares = ", ".join(f"{kind} {share:.0%}" for kind, share in profiled["shares"].items())
    print(f"tinylm's step at nanoGPT's config, profiled ({profiled['step_ms']:.1f} ms a step): {shares}")
    report = {"rows": rows, "matmul_peak_flops": peak, "time_ratio": ratio, "worst_val_loss": worst}
    print(json.dumps(report | {"profile": profiled}))


if __name__ == "__main__":
    main()
