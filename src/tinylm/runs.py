"""The run-folder contract: the names of the files tinylm writes, how it writes them, and how it claims an output.

A run folder (`tinylm train`, `tinylm import`) holds `config.yaml`, `model.safetensors` (the best weights),
`checkpoints/step-NNNNNNN/`, `metrics.jsonl`, `samples.txt`, `loss.png`, its tokenizer, `data.json` (what the
prepared data holds) and `environment.json` (each training session's hardware and software); a fine-tune output holds
`finetune.yaml`, `finetune.json` and the adapter (or a merged run in `model/`). `tinylm eval` adds `eval.json`
(benchmarks) and `stories.json` + `stories.md` (story quality) to either, and `tinylm report` adds `report.md` and its
PNGs; an export is a Hugging Face folder
(`config.json`) or a `.gguf` file. A pipeline folder (`tinylm pipeline`) holds `pipeline.json` and one sub-folder per
stage.

Every file is written atomically (a temporary file beside it, fsynced, renamed over it), so a crash or a full disk
leaves the old file or the new one, never half of one. A whole output (an import, an export) is built in a hidden
staging path beside its destination and swapped into place only once it is complete. `--overwrite` replaces only an
output of the same kind, never the input it is made from nor anything inside that, and never a folder tinylm did not
write: `check_output` is the one place that decides.

This is the bottom layer: it imports nothing of tinylm but its errors.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file
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
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's names for a LoRA adapter
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
HF_CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
DATA_FILE = "data.json"
EVAL_RESULT_FILE = "eval.json"
STORIES_RESULT_FILE = "stories.json"
STORIES_REPORT_FILE = "stories.md"
REPORT_FILE = "report.md"
PIPELINE_FILE = "pipeline.json"

OutputKind = Literal["run", "finetune", "hf", "gguf", "pipeline"]
KIND_NAMES: dict[OutputKind, str] = {
    "run": "tinylm run",
    "finetune": "tinylm fine-tune",
    "hf": "Hugging Face model folder",
    "gguf": "GGUF file",
    "pipeline": "tinylm pipeline",
}
GGUF_MAGIC = b"GGUF"


# --- What is at a path ----------------------------------------------------------------------------------------------


def output_kind(path: Path) -> OutputKind | None:
    """The kind of output at `path`, or None when nothing is there (a missing path or an empty folder).

    Anything else is refused: a folder or file that none of tinylm's writers could have left raises a one-line
    TinylmError, so that no caller can mistake it for something it may replace. A kind is recognised by content, not
    by a file name alone (a project folder with an unrelated config.yaml is not a run): a `config.yaml` mapping with a
    `model` section, a `finetune.yaml` mapping with a `base`, a `config.json` mapping with a `model_type`, a
    `pipeline.json` mapping with `stages`, a file that starts with the GGUF magic.
    """
    path = Path(path)
    if path.is_dir():
        if not any(path.iterdir()):
            return None
        if _mapping_with(path / FINETUNE_CONFIG_FILE, "base"):  # before `run`: a fine-tune's model/ is a run
            return "finetune"
        if _mapping_with(path / CONFIG_FILE, "model"):
            return "run"
        if _mapping_with(path / HF_CONFIG_FILE, "model_type"):
            return "hf"
        if _mapping_with(path / PIPELINE_FILE, "stages"):
            return "pipeline"
    elif path.is_file():
        with open(path, "rb") as file:
            if file.read(len(GGUF_MAGIC)) == GGUF_MAGIC:
                return "gguf"
    elif not path.exists() and not path.is_symlink():
        return None
    raise TinylmError(
        f"{path} is not tinylm output (a run, a fine-tune, a Hugging Face folder, a GGUF file or a pipeline), "
        "and tinylm never replaces what it did not write"
    )


def _mapping_with(path: Path, key: str) -> bool:
    """Whether `path` is a JSON or YAML file holding a mapping that has `key`."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and key in data


def is_run(path: Path) -> bool:
    """Whether `path` is a run folder that can be loaded: a config and the weights."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def results_folder(model: str | Path, out: str | Path | None = None) -> Path | None:
    """Where the evaluations of `model` are written: `out` when given, else the model itself when it is a run folder
    or a fine-tune output; None for other models (a Hugging Face folder or a .gguf is not tinylm's to write into)."""
    if out is not None:
        return Path(out).expanduser()
    path = Path(model).expanduser()
    return path if is_run(path) or (path / FINETUNE_RESULT_FILE).is_file() else None


def update_json(path: Path, section: str, entries: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Merge `entries` into the `section` mapping of the JSON file at `path` (created when missing), set `fields`,
    and write it atomically: a later evaluation of the same task replaces that task's entry and keeps the others."""
    data = read_json(path) if Path(path).is_file() else {}
    data.update(fields)
    data[section] = {**data.get(section, {}), **entries}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return data


# --- Claiming an output ---------------------------------------------------------------------------------------------


def check_output(
    out: Path, kind: OutputKind, overwrite: bool, inputs: Iterable[Path] = (), option: str = "--out"
) -> None:
    """Refuse, in one line that says what to do, to write a `kind` output at `out` when that would lose data.

    `out` may never be one of `inputs` (what the output is made from), lie inside one or hold one. An existing
    output of the same kind is replaced only with `overwrite`; anything else that is there is never replaced.
    """
    out = Path(out).expanduser()
    target = out.resolve()
    for source in inputs:
        source = Path(source).expanduser()
        found = source.resolve()
        if target == found:
            relation = "is"
        elif found in target.parents:
            relation = "lies inside"
        elif target in found.parents:
            relation = "holds"
        else:
            continue
        raise TinylmError(f"{out} {relation} the input {source}; choose another {option} outside it")
    if kind == "gguf" and out.is_dir():
        raise TinylmError(f"{out} is a folder; give a file path such as {out / 'model.gguf'} for {option}")
    try:
        found_kind = output_kind(out)
    except TinylmError:
        raise TinylmError(
            f"{out} is not empty and is not a {KIND_NAMES[kind]}: tinylm will not replace it; choose another {option}"
        ) from None
    if found_kind is None:
        return
    if found_kind != kind:
        raise TinylmError(f"{out} holds a {KIND_NAMES[found_kind]}, not a {KIND_NAMES[kind]}; choose another {option}")
    if not overwrite:
        raise TinylmError(f"{out} already holds a {KIND_NAMES[kind]}; choose another {option} or pass --overwrite")


@contextmanager
def staged_output(
    out: Path, kind: OutputKind, overwrite: bool, inputs: Iterable[Path] = (), option: str = "--out"
) -> Iterator[Path]:
    """Claim `out` (see check_output) and yield a hidden staging path beside it to write the output into: a folder
    for the folder kinds, a file path for gguf. When the block ends normally the staging path replaces `out`; on any
    exception (KeyboardInterrupt too) it is removed and `out` is left exactly as it was.

        with staged_output(Path("out/run-hf"), "hf", overwrite, inputs=[run_dir]) as staging:
            model.save_pretrained(staging)
    """
    out = Path(out).expanduser()
    remove_stale_staging(out.parent, out.name)  # first: a killed replacement may have left the old output aside
    check_output(out, kind, overwrite, inputs, option)
    with staged(out, folder=kind != "gguf") as staging:
        yield staging


@contextmanager
def staged(out: Path, folder: bool = True) -> Iterator[Path]:
    """staged_output without the claim, for a path its caller owns (a pipeline stage's folder): a staging folder (or
    file path) beside `out` that replaces it when the block ends normally, and is removed on any exception."""
    out = Path(out).expanduser()
    staging = staging_path(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove(staging)  # left by a killed process that had the same id
        if folder:
            staging.mkdir()
        yield staging
        replace_output(staging, out)
    except BaseException as error:
        _remove(staging)
        failure = write_failure(error, out)
        if failure is not None:
            raise failure from None
        raise


def replace_output(staging: Path, out: Path) -> None:
    """Put `staging` in place of `out`. A file replaces a file in one atomic rename; a folder cannot be renamed over
    a folder, so an existing `out` is first renamed aside and deleted only once `staging` is in its place: at every
    moment the whole old output or the whole new one exists, at `out` or (for the instant between the two renames)
    beside it, never a mixture."""
    if not staging.is_dir() or not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    aside = staging_path(out, "old")
    _remove(aside)
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _remove(aside)


def staging_path(path: Path, kind: Literal["tmp", "old"]) -> Path:
    """The hidden path beside `path` where this process stages its new version (tmp) or puts the old one aside
    (old). The process id in the name keeps two writers apart and tells whose a leftover is."""
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


STAGING_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>tmp|old)")


def remove_stale_staging(folder: Path, name: str | None = None) -> None:
    """Clean up what killed tinylm processes left in `folder` (staging paths whose process is gone; only those of
    `name` when given): a `.tmp` is deleted; an `.old` is the previous output, put aside by a replacement that was
    killed before the new output took its place, so it goes back to its name when nothing took it, else it goes."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = STAGING_NAME.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name) or process_alive(int(match["pid"])):
            continue
        original = folder / match["name"]
        if match["kind"] == "old" and not (original.exists() or original.is_symlink()):
            os.replace(entry, original)
        else:
            _remove(entry)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:  # not a process id at all
        return False
    return True


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree; nothing when there is none."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# --- Writing and reading files --------------------------------------------------------------------------------------


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; then flush it to the disk and rename it over `path`. On any
    error the temporary file is removed and `path` keeps its old bytes; a failed write becomes a one-line error."""
    path = Path(path)
    partial = staging_path(path, "tmp")
    try:
        yield partial
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # else a power cut after the rename can leave an empty file under the new name
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        failure = write_failure(error, path)
        if failure is not None:
            raise failure from None
        raise


def write_failure(error: BaseException, path: Path) -> TinylmError | None:
    """The one-line error for a write to `path` that failed with `error`, an OSError or safetensors' text form of
    one (its Rust I/O errors arrive as SafetensorError, errno in the message); None for any other error."""
    if isinstance(error, SafetensorError):
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            return None
        error = OSError(int(code[1]), os.strerror(int(code[1])))
    if not isinstance(error, OSError) and isinstance(error.__context__, OSError):
        error = error.__context__  # torch.save's writer reports the OSError of a file object as a RuntimeError
    if not isinstance(error, OSError):
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return TinylmError(f"no space left on the device holding {path}; free space and run again")
    reason = error.strerror or str(error)
    where = error.filename or path
    return TinylmError(f"{where}: {reason}; check the path and its permissions, then run again")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replace the file at `path` with `data` (text is written as UTF-8), whole or not at all."""
    with replacing(path) as partial:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2) + "\n")


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file tinylm wrote; a one-line TinylmError naming the file when it is missing or
    damaged. Only plain YAML is read: a `!!python` tag is refused, never run."""
    return _read(Path(path), yaml.safe_load, (yaml.YAMLError,))


def read_json(path: Path) -> dict[str, Any]:
    return _read(Path(path), json.loads, (ValueError,))


def _read(path: Path, parse, errors: tuple[type[Exception], ...]) -> dict[str, Any]:
    try:
        data = parse(path.read_text())
    except FileNotFoundError:
        raise TinylmError(f"{path} is missing; give a folder tinylm wrote, or write it again") from None
    except (OSError, UnicodeDecodeError, *errors) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TinylmError(f"cannot read {path} ({reason}); fix or restore the file") from None
    if not isinstance(data, dict):
        raise TinylmError(f"{path} does not hold a mapping of settings; fix or restore the file")
    return data


# --- Weights --------------------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> None:
    write_weights(model.state_dict(), path, tied_names(model), metadata)


def write_weights(
    weights: dict[str, torch.Tensor], path: Path, skip: set[str], metadata: dict[str, Any] | None = None
) -> None:
    """Write `weights` but the names in `skip` (second names of tied matrices: load_weights re-ties them)."""
    tensors = {name: tensor.contiguous() for name, tensor in weights.items() if name not in skip}
    with replacing(path) as partial:
        save_file(tensors, str(partial), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time, such as an output layer tied to the embedding."""
    first_names = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names


def load_weights(model: nn.Module, path: Path) -> None:
    """Put the weights saved at `path` into `model`; a one-line TinylmError when the file is damaged or holds
    tensors of other names or shapes than the model's (a config.yaml edited after the weights were written)."""
    try:
        load_model(model, str(path), device=str(next(model.parameters()).device))
    except RuntimeError as error:  # torch's load_state_dict: missing, unexpected or mis-shaped tensors
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise TinylmError(
            f"{path} does not fit the model its config describes ({first[0].strip().rstrip('.')}); restore the "
            f"config or the weights, or write the run again"
        ) from None
    except (OSError, SafetensorError) as error:
        raise _damaged(path, error) from None


def read_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a one-line TinylmError when it is missing or damaged."""
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError) as error:
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> TinylmError:
    if isinstance(error, FileNotFoundError) or not Path(path).is_file():
        return TinylmError(f"{path} is missing; restore it or write the run again")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TinylmError(f"{path} is damaged or truncated ({reason}); restore it or write the run again")
