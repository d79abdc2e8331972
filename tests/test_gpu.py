"""Checks that need a CUDA GPU: `make gpu-check` runs them on a GPU machine; the default test run skips them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

import tinylm

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
