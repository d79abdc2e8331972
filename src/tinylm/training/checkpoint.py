"""Run-folder files, written so that a crash at any moment leaves either the old file or the new one, never half.

- `model.safetensors`: the best weights so far (by validation loss), with the step and loss in its metadata.
- `checkpoints/step-NNNNNNN/`: the latest training state (weights, optimizer, RNG, counters). A checkpoint folder is
  filled under a temporary name and renamed when complete, so every `step-*` folder is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

BEST_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"


def save_weights(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> None:
    partial = path.with_name(path.name + ".tmp")
    # save_model stores a tied matrix once and load_model re-ties it.
    save_model(model, str(partial), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(partial, path)


def load_weights(model: nn.Module, path: Path) -> None:
    load_model(model, str(path), device=str(next(model.parameters()).device))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 1
) -> Path:
    """Write checkpoints/step-N/: weights, trainer state (optimizer, RNGs; loadable with weights_only=True) and
    `state.json` (step and `info`, for people); keep the newest `keep` checkpoints."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    partial = root / f".step-{step:07d}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_weights(model, partial / "model.safetensors")
    torch.save(trainer_state, partial / "trainer.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None
