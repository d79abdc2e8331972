"""Training across processes: a run killed with SIGKILL resumes exactly, and `torchrun` with 2 CPU processes (gloo)
trains what one process trains, under DDP and FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, capitals_examples, capitals_pairs, tiny_overrides
from safetensors.torch import load_file

import tinylm
from tinylm.cli import main
from tinylm.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


def cli_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]


def run(command: list[str]) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode in (0, -9), done.stderr[-3000:]


def read_records(run_dir) -> tuple[list, list]:
    """Training records (step, loss, grad_norm, lr) and evaluation records (step, train and val loss)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    return steps, evals


KILL_AT_STEP = """
import os, signal, sys
from tinylm.cli import main
from tinylm.training.engine import Engine

step = Engine.train_step

def killed_during_step(self):
    if self.step + 1 == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)

Engine.train_step = killed_during_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_at_any_step_resumes_bitwise_identical(text_file, tmp_path):
    # Dropout on, so that the RNG state matters too; a weight average, which the checkpoint must carry; one thread
    # in both processes, as the killed one's OMP_NUM_THREADS says (sums over other threads round otherwise).
    overrides = {"model.dropout": 0.1, "train.log_interval": 1, "train.eval_interval": 5, "train.keep_checkpoints": 2}
    overrides |= {"train.ema_decay": 0.9, "train.threads": 1}
    reference = tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "reference", **overrides)))

    killed = tmp_path / "killed"
    os.environ["KILL_AT_STEP"] = "13"
    try:
        run([sys.executable, "-c", KILL_AT_STEP, "train", *cli_args(tiny_overrides(text_file, killed, **overrides))])
    finally:
        del os.environ["KILL_AT_STEP"]
    assert latest_checkpoint(killed).name == "step-0000010"
    assert main(["train", "--resume", str(killed)]) == 0

    assert read_records(killed) == read_records(reference.run_dir)
    for name in ("model.safetensors", "checkpoints/step-0000020/model.safetensors"):
        ours, theirs = load_file(killed / name), load_file(reference.run_dir / name)
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_torchrun_ddp_then_fsdp_resumed_trains_what_one_process_trains(text_file, tmp_path):
    # A constant learning rate after warm-up, so that a run of 4 steps resumed to 8 has the schedule of 8 steps; a
    # weight average, which FSDP must take over from DDP's checkpoint sharded.
    overrides = {"train.log_interval": 1, "train.eval_interval": 4, "train.max_steps": 8, "train.min_lr_ratio": 1.0}
    overrides["train.ema_decay"] = 0.5
    single = tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "single", **overrides)))

    shared = tmp_path / "shared"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    first_half = tiny_overrides(text_file, shared, **{**overrides, "train.max_steps": 4, "train.parallel": "ddp"})
    run([*torchrun, "-m", "tinylm", "train", *cli_args(first_half)])
    run(
        [
            *torchrun,
            "-m",
            "tinylm",
            "train",
            "--resume",
            str(shared),
            "--train.max_steps",
            "8",
            "--train.parallel",
            "fsdp",
        ]
    )

    (steps, evals), (expected_steps, expected_evals) = read_records(shared), read_records(single.run_dir)
    assert [s[0] for s in steps] == list(range(1, 9)) and [e[0] for e in evals] == [4, 8]
    for ours, theirs in zip(steps + evals, expected_steps + expected_evals):
        assert ours == pytest.approx(theirs, rel=1e-5)
    ours, theirs = load_file(shared / "model.safetensors"), load_file(single.run_dir / "model.safetensors")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def capitals(tmp_path_factory) -> tuple[Path, Path]:
    """A tinylm base pretrained briefly on the capitals examples as text (byte-level BPE), and the examples."""
    folder = tmp_path_factory.mktemp("finetune")
    examples = capitals_examples(60)
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    text = folder / "text.txt"
    text.write_text(
        "".join(f"### User:\n{e['instruction']}\n\n{e['input']}\n\n### Assistant:\n{e['output']}\n\n" for e in examples)
    )
    overrides = {"data.tokenizer": "bpe:300", "model.block_size": 64, "data.data_dir": str(folder / "data")}
    base = tinylm.train(tinylm.load_config(None, tiny_overrides(text, folder / "base", **overrides))).run_dir
    return base, data


def finetune_args(base: Path, data: Path, out: Path) -> list[str]:
    train = {"max_steps": 6, "batch_size": 4, "eval_interval": 3, "log_interval": 1, "warmup_steps": 1}
    train |= {"learning_rate": 1e-2, "device": "cpu", "seed": 0}
    options = {"base": base, "data": data, "out": out, "held-out-examples": 8, "max-length": 48, "lora-dropout": 0}
    return ["finetune", *cli_args(options), *cli_args({f"train.{key}": value for key, value in train.items()})]


def fine_tune_records(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timings = ("elapsed_s", "tokens_per_s", "memory_gb")
    return [tuple(value for key, value in r.items() if key not in timings) for r in records]


def test_a_fine_tune_killed_with_sigkill_resumes_bitwise_identical(capitals, tmp_path):
    base, data = capitals
    assert main(finetune_args(base, data, tmp_path / "reference")) == 0
    killed = tmp_path / "killed"
    os.environ["KILL_AT_STEP"] = "5"
    try:
        run([sys.executable, "-c", KILL_AT_STEP, *finetune_args(base, data, killed)])
    finally:
        del os.environ["KILL_AT_STEP"]
    assert latest_checkpoint(killed).name == "step-0000003"
    assert main([*finetune_args(base, data, killed), "--resume"]) == 0

    assert fine_tune_records(killed) == fine_tune_records(tmp_path / "reference")
    ours, theirs = (load_file(out / "adapter_model.safetensors") for out in (killed, tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_dpo_fine_tune_killed_with_sigkill_resumes_bitwise_identical(capitals, tmp_path):
    # Every weight trained: the reference is a copy of the base taken at setup, never of the weights resumed from.
    base, _ = capitals
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in capitals_pairs(40)))

    def dpo_args(out: Path) -> list[str]:
        # One thread here as in the killed process (OMP_NUM_THREADS=1): CPU kernels sum in an order that depends on
        # the number of threads.
        return [*finetune_args(base, data, out), "--method", "dpo", "--full", "--train.threads", "1"]

    threads = torch.get_num_threads()
    try:
        assert main(dpo_args(tmp_path / "reference")) == 0
        killed = tmp_path / "killed"
        os.environ["KILL_AT_STEP"] = "5"
        try:
            run([sys.executable, "-c", KILL_AT_STEP, *dpo_args(killed)])
        finally:
            del os.environ["KILL_AT_STEP"]
        assert latest_checkpoint(killed).name == "step-0000003"
        assert main([*dpo_args(killed), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)

    assert fine_tune_records(killed) == fine_tune_records(tmp_path / "reference")
    assert "preference_accuracy" in (killed / "metrics.jsonl").read_text()
    ours, theirs = (load_file(out / "model" / "model.safetensors") for out in (killed, tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_torchrun_fine_tune_matches_one_process(capitals, tmp_path):
    base, data = capitals
    assert main(finetune_args(base, data, tmp_path / "single")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run([*torchrun, "-m", "tinylm", *finetune_args(base, data, tmp_path / "two")])

    for ours, theirs in zip(fine_tune_records(tmp_path / "two"), fine_tune_records(tmp_path / "single"), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    ours, theirs = (load_file(out / "adapter_model.safetensors") for out in (tmp_path / "two", tmp_path / "single"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)
