"""Time to nanoGPT's CPU-recipe validation loss on Tiny Shakespeare, tinylm's recipe against nanoGPT's, side by side.

Each recipe runs as a user would run it (`tinylm train`, a fresh process), then `tinylm eval` scores the best weights
on the whole validation split. Reported: wall-clock seconds of the whole command, seconds of the training loop, tokens
per second, and the full-split val loss. The nanoGPT row replays nanoGPT's documented CPU command
(4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations, lr 1e-3, no dropout, warm-up 100, cosine to
1e-4, beta2 0.99) inside tinylm, so the two rows differ only in the recipe.

    python bench/shakespeare_char.py [--repeats 2] [--recipe configs/shakespeare-char.yaml] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_VAL_LOSS = 1.886  # nanoGPT's CPU recipe on this split (its README: "val loss 1.88")
NANOGPT_CPU = [
    "--model.block_size",
    "64",
    "--model.n_layer",
    "4",
    "--model.n_head",
    "4",
    "--model.n_embd",
    "128",
    "--model.dropout",
    "0.0",
    "--model.bias",
    "false",
    "--train.optimizer",
    "adamw",
    "--train.batch_size",
    "12",
    "--train.max_steps",
    "2000",
    "--train.learning_rate",
    "1e-3",
    "--train.warmup_steps",
    "100",
    "--train.min_lr_ratio",
    "0.1",
    "--train.beta2",
    "0.99",
    "--train.eval_interval",
    "250",
    "--train.eval_batches",
    "20",
    "--train.grad_clip",
    "1.0",
    "--train.weight_decay",
    "0.1",
]


def run_recipe(recipe: str, overrides: list[str], workdir: Path, label: str) -> dict:
    out = workdir / label
    command = [
        sys.executable,
        "-m",
        "tinylm",
        "train",
        recipe,
        "--out",
        str(out),
        "--overwrite",
        "--sample.max_new_tokens",
        "0",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    full = subprocess.run(
        [sys.executable, "-m", "tinylm", "eval", str(out), "--json"], check=True, capture_output=True, text=True
    )
    val = json.loads(full.stdout)["val"]
    return {
        "recipe": label,
        "wall_s": wall_s,
        "loop_s": evals[-1]["elapsed_s"],
        "tokens_per_s": statistics.median(speeds),
        "val_loss_full": val["loss"],
        "val_bpb": val["bpb"],
        "reaches_target": val["loss"] <= TARGET_VAL_LOSS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/shakespeare-char.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-nanogpt", action="store_true", help="Run only tinylm's recipe.")
    parser.add_argument("overrides", nargs="*", help="Extra dotted overrides for tinylm's recipe (after --).")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            # Alternate the two recipes so that drift in the machine's speed hits both alike.
            rows.append(run_recipe(args.recipe, args.overrides, Path(workdir), f"tinylm-{repeat}"))
            if not args.skip_nanogpt:
                rows.append(run_recipe(args.recipe, NANOGPT_CPU, Path(workdir), f"nanogpt-cpu-{repeat}"))
    print(
        f"{'recipe':<16}{'wall s':>8}{'loop s':>8}{'tok/s':>9}{'val loss':>10}{'val bpb':>9}  target {TARGET_VAL_LOSS}"
    )
    for row in rows:
        print(
            f"{row['recipe']:<16}{row['wall_s']:>8.1f}{row['loop_s']:>8.1f}{row['tokens_per_s']:>9,.0f}"
            f"{row['val_loss_full']:>10.4f}{row['val_bpb']:>9.4f}  {'yes' if row['reaches_target'] else 'NO'}"
        )
    ours = [r["wall_s"] for r in rows if r["recipe"].startswith("tinylm")]
    theirs = [r["wall_s"] for r in rows if r["recipe"].startswith("nanogpt")]
    if theirs:
        ratio = statistics.median(theirs) / statistics.median(ours)
        print(f"wall-clock ratio, nanoGPT recipe / tinylm recipe: {ratio:.2f}x")
    print(f"tinylm recipe vs nanoGPT's measured 81 s: {81 / statistics.median(ours):.2f}x faster")


if __name__ == "__main__":
    main()
