"""Checks that need a CUDA GPU: `make test-gpu` runs them on a GPU machine with the venv; the default test run skips
them. On a lent GPU machine without registries, `make gpu-check` (bench/gpu_check.py) runs the same paths and times
them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

import tinylm
from tinylm.training.checkpoint import latest_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_training_generation_and_evaluation_run_on_cuda(text_file, tmp_path):
    config = tinylm.load_config(None, tiny_overrides(text_file, tmp_path / "run", **{"train.device": "cuda"}))
    result = tinylm.train(config)
    run = tinylm.load(result.run_dir, device="cuda")
    assert next(run.model.parameters()).is_cuda
    assert run.generate("All:", max_new_tokens=10, seed=1) == run.generate("All:", max_new_tokens=10, seed=1)
    cpu_loss = tinylm.load(result.run_dir, device="cpu").evaluate().loss
    assert run.evaluate().loss == pytest.approx(cpu_loss, rel=1e-4)


def gpu_run(text_file, out, **extra) -> tinylm.TrainResult:
    overrides = {"train.device": "cuda", "train.log_interval": 1, "train.learning_rate": 1e-2, **extra}
    return tinylm.train(tinylm.load_config(None, tiny_overrides(text_file, out, **overrides)))


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="needs bf16")
def test_auto_precision_is_bf16_autocast_and_it_trains(text_file, tmp_path, capsys):
    result = gpu_run(text_file, tmp_path / "run")
    assert "bf16 autocast" in capsys.readouterr().out
    assert losses(result.run_dir)[-1] < losses(result.run_dir)[0]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in records if "mfu" in r)  # GPUs missing from the peak table have none


def test_fp16_with_loss_scaling_trains(text_file, tmp_path):
    result = gpu_run(text_file, tmp_path / "run", **{"train.precision": "fp16"})
    state = torch.load(latest_checkpoint(result.run_dir) / "trainer.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler was on and its state is saved for resume
    assert losses(result.run_dir)[-1] < losses(result.run_dir)[0]


def test_compiled_model_trains_like_the_eager_one(text_file, tmp_path):
    eager = gpu_run(text_file, tmp_path / "eager", **{"train.compile": False, "train.precision": "fp32"})
    compiled = gpu_run(text_file, tmp_path / "compiled", **{"train.compile": True, "train.precision": "fp32"})
    assert losses(compiled.run_dir) == pytest.approx(losses(eager.run_dir), rel=1e-3)


def test_adamw_is_fused_on_cuda():
    from tinylm.model import build_model
    from tinylm.training.optim import build_optimizers

    config = tinylm.load_config(
        None, {"model.vocab_size": 10, "model.n_layer": 1, "model.n_embd": 8, "model.n_head": 2}
    )
    (adamw,) = build_optimizers(build_model(config.model).cuda(), config.train, "cuda")
    assert adamw.defaults["fused"]


def test_micro_batch_is_fitted_and_accumulation_matches(text_file, tmp_path):
    whole = gpu_run(text_file, tmp_path / "whole", **{"train.precision": "fp32", "train.batch_size": 32})
    parts = gpu_run(
        text_file,
        tmp_path / "parts",
        **{"train.precision": "fp32", "train.batch_size": 32, "train.micro_batch_size": 8},
    )
    assert losses(parts.run_dir) == pytest.approx(losses(whole.run_dir), rel=1e-4)


def test_torchrun_with_one_gpu(text_file, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(text_file, out, **{"train.device": "cuda"})
    args = [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    done = subprocess.run([*command, "-m", "tinylm", "train", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert latest_checkpoint(out).name == "step-0000020"
