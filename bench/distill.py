"""Distillation on Tiny Shakespeare: a small student with a teacher against the same student alone, side by side.

The teacher is `configs/shakespeare-char.yaml` trained as it ships. Three students of the same small shape then train
on the same data: with the teacher (`--train.teacher`), alone for the same steps, and alone for the wall time the
taught student took (the teacher's forward passes cost time). Each is scored by `tinylm eval` on the whole val split
in bits per byte. Run it alone: two CPU-bound jobs on these cores slow each other many times over.

    python bench/distill.py [--student-steps 600] [--distill-weight 0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STUDENT = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "64"]  # half the teacher's width


def tinylm(*args: str) -> tuple[float, str]:
    """Run a tinylm command as a user would; its wall-clock seconds and standard output."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - began, done.stdout


def train_seconds(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["elapsed_s"] for r in records if "elapsed_s" in r)


def val_bpb(run: Path) -> float:
    _, out = tinylm("eval", str(run), "--json")
    return json.loads(out)["val"]["bpb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    common = ["--train.threads", str(args.threads), "--train.eval_interval", "200", *STUDENT]
    with tempfile.TemporaryDirectory() as work:
        teacher = Path(work) / "teacher"
        tinylm("train", "configs/shakespeare-char.yaml", "--out", str(teacher), "--train.threads", str(args.threads))
        steps = ["--train.max_steps", str(args.student_steps)]
        taught = Path(work) / "taught"
        tinylm("train", "configs/shakespeare-char.yaml", *common, *steps, "--out", str(taught),
               "--train.teacher", str(teacher), "--train.distill_weight", str(args.distill_weight))  # fmt: skip
        alone = Path(work) / "alone"
        tinylm("train", "configs/shakespeare-char.yaml", *common, *steps, "--out", str(alone))
        per_step_alone = train_seconds(alone) / args.student_steps
        same_time_steps = round(train_seconds(taught) / per_step_alone)
        alone_longer = Path(work) / "alone-same-time"
        tinylm("train", "configs/shakespeare-char.yaml", *common, "--train.max_steps", str(same_time_steps),
               "--out", str(alone_longer))  # fmt: skip
        rows = [
            ("student taught by the recipe's model", taught, args.student_steps),
            ("student alone, same steps", alone, args.student_steps),
            ("student alone, same wall time", alone_longer, same_time_steps),
            ("teacher (configs/shakespeare-char.yaml)", teacher, None),
        ]
        print(f"# distillation, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads, distill_weight {args.distill_weight}")  # fmt: skip
        print("| model | steps | training s | val bits per byte |\n|---|---:|---:|---:|")
        for name, run, run_steps in rows:
            shown = run_steps if run_steps is not None else "recipe"
            print(f"| {name} | {shown} | {train_seconds(run):.1f} | {val_bpb(run):.4f} |")


if __name__ == "__main__":
    main()
