"""Training tokens per second on every core of a CPU: nanoGPT-style (one process, one torch thread per core) against
`tinylm train` under `torchrun` (one process per core, one thread each, gradients averaged by DDP over gloo).

The model and global batch are nanoGPT's Tiny Shakespeare CPU command (4 layers, 4 heads, width 128, context 64,
batch 12, no dropout, no bias). At this size a step is a few hundred small matrix products: splitting each product
over two threads gains little, while two processes each running half the batch on their own core keep both cores
busy and only meet once a step to average 0.8 MB of gradients. The reference is bench/train_step_speed.py's
nanoGPT-style step, run for `--steps` steps; tinylm's figure is the median tokens/s its own log records (global
tokens, so both count the same thing). The two sides run alternately, `--rounds` times, and the machine must be
otherwise idle: each side uses every core.

    python bench/train_cpu_processes.py [--rounds 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step_speed import BATCH_SIZE, BLOCK_SIZE, NANOGPT_CPU_CONFIG, ReferenceTrainer

from tinylm.config import DataConfig
from tinylm.data.prepare import prepare


def reference_tokens_per_s(train_bin: Path, vocab_size: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    trainer = ReferenceTrainer(train_bin, vocab_size)
    for _ in range(20):  # warm-up
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * BATCH_SIZE * BLOCK_SIZE / (time.perf_counter() - start)


def tinylm_tokens_per_s(workdir: Path, processes: int, steps: int) -> float:
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    options = {
        **NANOGPT_CPU_CONFIG,
        "train.max_steps": steps + 20,
        "train.eval_interval": steps + 20,
        "train.log_interval": 10,
        "train.threads": 1,
        "sample.max_new_tokens": 1,
        "out": str(run_dir),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "tinylm", "train"] + [f"--{key}={value}" for key, value in options.items()]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(command, check=True, capture_output=True, env=environment)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 20]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    data = prepare(DataConfig(source="tinyshakespeare"))
    train_bin = data.folder / data.meta["splits"]["train"]["files"][0]
    print(f"{args.cores} cores, torch {torch.__version__}, global batch {BATCH_SIZE} x {BLOCK_SIZE} tokens")
    results: dict[str, list[float]] = {"nanoGPT-style, 1 process": [], "tinylm, torchrun": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            reference = reference_tokens_per_s(train_bin, data.tokenizer.vocab_size, args.steps, args.cores)
            results["nanoGPT-style, 1 process"].append(reference)
            results["tinylm, torchrun"].append(tinylm_tokens_per_s(Path(workdir), args.cores, args.steps))
    ratios = [ours / theirs for theirs, ours in zip(*results.values())]
    print("| side | threads x processes | tokens/s per round | median |")
    print("|---|---|---|---:|")
    layouts = [f"{args.cores} x 1", f"1 x {args.cores}"]
    for (name, speeds), layout in zip(results.items(), layouts):
        print(f"| {name} | {layout} | {', '.join(f'{s:,.0f}' for s in speeds)} | {statistics.median(speeds):,.0f} |")
    print(
        f"tinylm / nanoGPT-style per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median "
        f"{statistics.median(ratios):.2f}x"
    )


if __name__ == "__main__":
    main()
