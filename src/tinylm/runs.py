"""TEMPORARY stand-in for the run-folder contract (the runsfolder branch replaces this file)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_model, save_file
from torch import nn

from tinylm.errors import TinylmError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
LOSS_PLOT = "loss.png"
FINETUNE_CONFIG_FILE = "finetune.yaml"
FINETUNE_RESULT_FILE = "finetune.json"
MERGED_MODEL_FOLDER = "model"
HF_CONFIG_FILE = "config.json"
OutputKind = Literal["run", "finetune", "hf", "gguf"]


def output_kind(path: Path) -> str | None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    if (path / CONFIG_FILE).is_file():
        return "run"
    if (path / FINETUNE_CONFIG_FILE).is_file():
        return "finetune"
    return "other"


def check_output(out: Path, kind: str, overwrite: bool, inputs: Iterable[Path] = (), option: str = "--out") -> None:
    found = output_kind(out)
    if found is None:
        return
    if found != kind:
        raise TinylmError(f"{out} exists and is not a tinylm {kind} folder; choose another {option}")
    if not overwrite:
        raise TinylmError(f"{out} already holds a {kind}; choose another {option} or pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(out: Path, kind: str, overwrite: bool, inputs=(), option="--out") -> Iterator[Path]:
    check_output(out, kind, overwrite, inputs, option)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_output(staging, out)


def replace_output(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def write_atomically(path: Path, data: str | bytes) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)


def write_yaml(path: Path, data: dict) -> None:
    write_atomically(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2))


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def is_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_weights(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> None:
    write_weights(model.state_dict(), path, tied_names(model), metadata)


def write_weights(
    weights: dict[str, torch.Tensor], path: Path, skip: set[str], metadata: dict[str, Any] | None = None
) -> None:
    partial = path.with_name(path.name + ".tmp")
    tensors = {name: tensor.contiguous() for name, tensor in weights.items() if name not in skip}
    save_file(tensors, str(partial), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(partial, path)


def tied_names(model: nn.Module) -> set[str]:
    first_names = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names


def load_weights(model: nn.Module, path: Path) -> None:
    load_model(model, str(path), device=str(next(model.parameters()).device))
