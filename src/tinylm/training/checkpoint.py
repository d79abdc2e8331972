"""Checkpoints: `checkpoints/step-NNNNNNN/` in a run folder holds the training state at that step.

Each holds `model.safetensors` (weights), `trainer.pt` (optimizer, schedule, loss scaler, every process's RNG, the data
position; loadable with weights_only=True) and `state.json` (counters, for people and for resuming). A checkpoint
folder is filled under a temporary name and renamed when complete, so every `step-*` folder is whole; the newest `keep`
are kept. The run folder's other files, and how each is written, are tinylm.runs's.

Weights and optimizer state are stored whole (unsharded, keyed by parameter name) whatever the parallelism: a run
trained with FSDP on 8 GPUs resumes on 1 GPU or on CPU, and its checkpoints load like any other run's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tinylm.runs import CHECKPOINTS, WEIGHTS_FILE, read_json, write_json, write_weights

STATE_FILE = "state.json"
TRAINER_STATE_FILE = "trainer.pt"


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    skip: set[str],
    trainer_state: dict[str, Any],
    info: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write checkpoints/step-N/ whole or not at all, and keep the newest `keep` checkpoints."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    if final.is_dir():  # a step's state is saved once (Ctrl-C right after an evaluation has nothing new to save)
        return final
    partial = root / f".step-{step:07d}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(weights, partial / WEIGHTS_FILE, skip)
    torch.save(trainer_state, partial / TRAINER_STATE_FILE)
    write_json(partial / STATE_FILE, {"step": step, **info})
    os.replace(partial, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, trainer state and state.json of a checkpoint folder."""
    weights = load_file(str(path / WEIGHTS_FILE))
    trainer_state = torch.load(path / TRAINER_STATE_FILE, weights_only=True)
    return weights, trainer_state, read_json(path / STATE_FILE)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None
