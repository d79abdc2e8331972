"""Run-folder files, written so that a crash at any moment leaves either the old file or the new one, never half.

- `model.safetensors`: the best weights so far (by validation loss), with the step and loss in its metadata.
- `checkpoints/step-NNNNNNN/`: the training state at that step: `model.safetensors` (weights), `trainer.pt`
  (optimizer, schedule, loss scaler, every process's RNG, the data position; loadable with weights_only=True) and
  `state.json` (counters, for people and for resuming). A checkpoint folder is filled under a temporary name and
  renamed when complete, so every `step-*` folder is whole; the newest `keep` are kept.

Weights and optimizer state are stored whole (unsharded, keyed by parameter name) whatever the parallelism: a run
trained with FSDP on 8 GPUs resumes on 1 GPU or on CPU, and its checkpoints load like any other run's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

BEST_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"


def save_weights(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> None:
    write_weights(model.state_dict(), path, tied_names(model), metadata)


def write_weights(
    weights: dict[str, torch.Tensor], path: Path, skip: set[str], metadata: dict[str, Any] | None = None
) -> None:
    """Write `weights` but the names in `skip` (second names of tied matrices: load_weights re-ties them)."""
    partial = path.with_name(path.name + ".tmp")
    tensors = {name: tensor.contiguous() for name, tensor in weights.items() if name not in skip}
    save_file(tensors, str(partial), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(partial, path)


def tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time, such as an output layer tied to the embedding."""
    first_names = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names


def load_weights(model: nn.Module, path: Path) -> None:
    load_model(model, str(path), device=str(next(model.parameters()).device))


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
    write_weights(weights, partial / "model.safetensors", skip)
    torch.save(trainer_state, partial / "trainer.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    os.replace(partial, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, trainer state and state.json of a checkpoint folder."""
    weights = load_file(str(path / "model.safetensors"))
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    return weights, trainer_state, json.loads((path / "state.json").read_text())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None
