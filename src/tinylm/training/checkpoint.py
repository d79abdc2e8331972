"""Checkpoints: `checkpoints/step-NNNNNNN/` in a run folder holds the training state at that step.

Each holds `model.safetensors` (weights), `trainer.pt` (optimizer, schedule, loss scaler, every process's RNG, the data
position; loadable with weights_only=True) and `state.json` (counters, for people and for resuming). A checkpoint
folder is filled under a temporary name and renamed when complete, so every `step-*` folder is whole; the newest `keep`
are kept. The run folder's other files, and how each is written, are tinylm.runs's.

Weights and optimizer state are stored whole (unsharded, keyed by parameter name) whatever the parallelism: a run
trained with FSDP on 8 GPUs resumes on 1 GPU or on CPU, and its checkpoints load like any other run's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm.errors import TinylmError
from tinylm.runs import (
    CHECKPOINTS,
    WEIGHTS_FILE,
    read_json,
    read_weights,
    replace_output,
    replacing,
    staging_path,
    write_json,
    write_weights,
)

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
    partial = staging_path(final, "tmp")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        write_weights(weights, partial / WEIGHTS_FILE, skip)
        # Unbuffered, so that a full disk reaches torch's writer as the OSError it is (see runs.replacing).
        with replacing(partial / TRAINER_STATE_FILE) as temporary, open(temporary, "wb", buffering=0) as file:
            torch.save(trainer_state, file)
        write_json(partial / STATE_FILE, {"step": step, **info})
        replace_output(partial, final)  # a checkpoint of this step from before a resume, damaged maybe, goes
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a half-written checkpoint is never left behind
        raise
    for old in checkpoint_folders(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    """Optimizers, schedulers, loss scaler, RNGs, batch generator (see the module docstring)."""
    info: dict[str, Any]
    """state.json: the step, counters, and the settings the run must keep (`fixed`)."""


TRAINER_STATE_KEYS = ("optimizers", "schedulers", "scaler", "rng", "batch_rng")
INFO_KEYS = ("step", "best", "evals_without_improvement", "elapsed_s", "start_scores")


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in `path`; a one-line TinylmError naming the file when one of its files is missing, truncated
    or lacks what resuming needs."""
    weights = read_weights(path / WEIGHTS_FILE)
    info = read_json(path / STATE_FILE)
    trainer_file = path / TRAINER_STATE_FILE
    try:
        trainer_state = torch.load(trainer_file, weights_only=True)
    except FileNotFoundError:
        raise TinylmError(f"{trainer_file} is missing; resume from another checkpoint or train again") from None
    except Exception as error:  # torch reports a truncated or foreign file as RuntimeError, UnpicklingError, EOFError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TinylmError(f"{trainer_file} is damaged or truncated ({reason[:200]})") from None
    for file, record, keys in ((trainer_file, trainer_state, TRAINER_STATE_KEYS), (path / STATE_FILE, info, INFO_KEYS)):
        missing = [key for key in keys if not isinstance(record, dict) or key not in record]
        if missing:
            raise TinylmError(f"{file} lacks '{missing[0]}': it is damaged or was not written by tinylm")
    if not isinstance(info["step"], int):
        raise TinylmError(f"{path / STATE_FILE} holds a step that is not a number: it is damaged")
    return Checkpoint(path, weights, trainer_state, info)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (`step-` and seven digits), oldest first."""
    return sorted((run_dir / CHECKPOINTS).glob("step-" + "[0-9]" * 7))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_folders(run_dir)
    return found[-1] if found else None


def latest_whole_checkpoint(run_dir: Path, at_most: int | None = None) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint that loads (of step `at_most` or earlier, if given), and why each newer one did not (a
    disk that failed, a file that was cut short): training goes on from the last good state. A one-line TinylmError
    when none loads."""
    damaged = []
    folders = checkpoint_folders(run_dir)
    if at_most is not None:
        folders = [path for path in folders if int(path.name.removeprefix("step-")) <= at_most]
    for path in reversed(folders):
        try:
            return load_checkpoint(path), damaged
        except TinylmError as error:
            damaged.append(str(error))
    if not damaged:
        raise TinylmError(f"{run_dir} has no checkpoint to resume from; start it again with --overwrite")
    raise TinylmError(
        f"no checkpoint of {run_dir} can be read ({len(damaged)} tried; the newest: {damaged[0]}); "
        "start it again with --overwrite"
    )
