"""Recipes: a YAML file with one section per config dataclass, and dotted command-line overrides on top of it
(`--train.max_steps 500`, or `--train.max-steps 500`), parsed into a `Config`. The parsing, type checking and `--help`
text come from jsonargparse, which reads the dataclasses and their attribute docstrings; its multi-line errors become
one line that names the key and the fix. `model.preset` layers a named model (`tinylm.model.presets`) under the
recipe's model keys. `config_reference` writes docs/config.md from the same dataclasses.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from tinylm.config import (
    Config,
    DataConfig,
    ModelConfig,
    PipelineConfig,
    PipelineEvalConfig,
    PipelineExportConfig,
    SampleConfig,
    TaskConfig,
    TrainConfig,
    apply_batch_tokens,
    check_config,
    config_from_dict,
    field_docs,
    run_config,
    saved_config,
)
from tinylm.errors import TinylmError
from tinylm.model.budget import block_matrices, block_vectors
from tinylm.model.presets import MODEL_PRESETS
from tinylm.runs import CONFIG_FILE, read_yaml

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help and docs/config.md show the fields' docstrings

SECTION_NAMES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "task": TaskConfig,
}


def config_parser() -> ArgumentParser:
    """An argument parser with one `--section.key` option per config field, and `--config FILE` for a recipe."""
    parser = ArgumentParser(exit_on_error=False, description="Train a model from a recipe and dotted overrides.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML recipe; options after it override its keys.")
    parser.add_class_arguments(Config, None, as_group=False)
    return parser


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a Config from a YAML recipe and overrides (`["--train.max_steps", "10"]` or `{"train.max_steps": 10}`)."""
    args = ["--config", str(recipe)] if recipe is not None else []
    if isinstance(overrides, list):
        args += overrides
    parser = config_parser()
    values = parse_user_values(parser, args)
    for dotted, value in overrides.items() if isinstance(overrides, dict) else []:
        *sections, key = dotted.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return resolve_config(values, parser)


def config_of_model(target: str) -> Config:
    """The config behind a model preset name, `depth:N` (the depth dial), a recipe file, or a run folder (the
    config.yaml `tinylm train` wrote)."""
    path = Path(target)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise TinylmError(f"{target} holds no {CONFIG_FILE}; give a model preset, a recipe or a run folder")
        return run_config(path)
    if path.is_file():
        return load_config(path)
    if target.startswith("depth:"):
        depth = target.removeprefix("depth:")
        if not depth.isdigit():
            raise TinylmError(f"'{target}': give the depth dial as depth:N with a whole number N, e.g. depth:6")
        return resolve_config({"model": {"depth": int(depth)}})
    if target not in MODEL_PRESETS:
        raise TinylmError(
            f"'{target}' is not a model preset, recipe or run folder{_did_you_mean(target, MODEL_PRESETS)}"
        )
    return resolve_config({"model": {"preset": target}})


def parse_user_values(parser: ArgumentParser, args: list[str]) -> dict[str, Any]:
    """The keys the user set (in the recipe or on the command line), type-checked, without defaults filled in."""
    if args and not args[0].startswith("-"):
        args = ["--config", *args]  # `tinylm train RECIPE ...`: the recipe is the first positional argument
    if len(args) >= 2 and args[0] == "--config":
        if not Path(args[1]).is_file():
            raise TinylmError(f"recipe not found: {args[1]} (see configs/ for the recipes that ship with tinylm)")
        read_yaml(Path(args[1]))  # a recipe that is not a YAML mapping is named; jsonargparse's words would not
    args = [_underscored(arg) for arg in args]
    try:
        values = parser.parse_args(args, defaults=False).as_dict()
    except Exception as error:  # jsonargparse reports every parse problem as ArgumentError or ValueError
        raise TinylmError(explain_parse_error(str(error))) from None
    values.pop("config", None)
    return values


def resolve_config(user_values: dict[str, Any], parser: ArgumentParser | None = None) -> Config:
    """Layer defaults, the model preset (or the depth dial's sizes) and the user's values, and check the result."""
    for section, value in user_values.items():
        if section in SECTION_NAMES and not isinstance(value, dict):
            raise TinylmError(f"config section '{section}' must be a mapping of keys to values, not {value!r}")
    model = user_values.get("model", {})
    preset, depth = model.get("preset"), model.get("depth")
    if preset is not None and depth is not None:
        raise TinylmError("model.preset and model.depth both size the model; choose one")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise TinylmError(f"unknown model preset '{preset}'{_did_you_mean(preset, MODEL_PRESETS)}")
        user_values = {**user_values, "model": {**MODEL_PRESETS[preset], **model}}
    if isinstance(depth, int) and depth >= 1:
        user_values = {**user_values, "model": {**depth_sizes(depth), **model}}
    parser = parser or config_parser()
    try:
        config = parser.instantiate(parser.parse_object(user_values))
    except Exception as error:
        raise TinylmError(explain_parse_error(str(error))) from None
    config = Config(**{key: value for key, value in vars(config).items() if key in _field_names(Config)})
    train_given = user_values.get("train", {})
    config = apply_depth(config, set(train_given))
    config = apply_batch_tokens(config, "batch_size" in train_given)
    if config.model.depth is not None and "max_steps" not in train_given:
        config = replace(config, train=replace(config.train, max_steps=depth_steps(config)))
    check_config(config)
    return config


# The depth dial's scaling rules (docs/train.md, "One size dial"), after nanochat's: the width grows with the depth
# at a fixed aspect ratio, heads keep a fixed size, AdamW's learning rate falls as 1 / sqrt(width) from GPT-2 small's
# 6e-4 at 768 wide, and the run sees 20 tokens per block parameter (Chinchilla's ratio).
DEPTH_ASPECT_RATIO = 64
"""n_embd per layer."""
DEPTH_HEAD_DIM = 64
DEPTH_SEQUENCES_PER_LAYER = 8
"""batch_size = 8 sequences per layer."""
TOKENS_PER_PARAMETER = 20


def depth_sizes(depth: int) -> dict[str, int]:
    """The model sizes of model.depth."""
    width = DEPTH_ASPECT_RATIO * depth
    return {"n_layer": depth, "n_embd": width, "n_head": max(1, width // DEPTH_HEAD_DIM)}


def apply_depth(config: Config, train_given: set[str]) -> Config:
    """The train settings of a model sized by model.depth, under the ones the user gave."""
    if config.model.depth is None:
        return config
    derived = {
        "learning_rate": round(6e-4 * math.sqrt(768 / config.model.n_embd), 6),
        "batch_size": DEPTH_SEQUENCES_PER_LAYER * config.model.depth,
    }
    derived = {key: value for key, value in derived.items() if key not in train_given}
    return replace(config, train=replace(config.train, **derived))


def depth_steps(config: Config) -> int:
    """Steps of the run's batch that see 20 tokens per block parameter."""
    model = config.model
    tokens = TOKENS_PER_PARAMETER * model.n_layer * (block_matrices(model) + block_vectors(model))
    return max(1, math.ceil(tokens / (config.train.batch_size * model.block_size)))


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set."""
    keys = []
    for f in fields(cls):
        if f.name in SECTION_NAMES:
            keys += config_keys(SECTION_NAMES[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def config_reference() -> str:
    """docs/config.md: every key of every section with its type, default and meaning (`make docs` writes it), then
    the keys of a pipeline recipe (`tinylm pipeline`)."""
    lines = [
        "# Config reference",
        "",
        "Generated from the dataclasses in `src/tinylm/config.py` by `make docs`; do not edit by hand. A recipe sets",
        "these keys in YAML sections; the command line overrides any of them as `--section.key VALUE`.",
    ]
    for section, cls in SECTION_NAMES.items():
        lines += ["", f"## `{section}`", "", " ".join((cls.__doc__ or "").split()), ""]
        lines += reference_table(cls, f"{section}.")
    lines += ["", "## Pipeline recipes", "", " ".join((PipelineConfig.__doc__ or "").split()), ""]
    lines += reference_table(PipelineConfig, "")
    for section, cls in (("eval", PipelineEvalConfig), ("export", PipelineExportConfig)):
        lines += ["", f"### Pipeline `{section}`", "", " ".join((cls.__doc__ or "").split()), ""]
        lines += reference_table(cls, f"{section}.")
    return "\n".join(lines) + "\n"


def reference_table(cls: type, prefix: str) -> list[str]:
    """The markdown table of the fields of `cls`: key (with `prefix`), type, default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    helps, hints = field_docs(cls), get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default_factory is MISSING else f.default_factory()  # type: ignore[misc]
        default_text = "required" if default is MISSING else f"`{default!r}`"
        if is_dataclass(hints[f.name]):
            default_text = "its keys below"
        meaning = helps.get(f.name, "").replace("|", "\\|")
        kind = str(f.type).replace("|", "or")
        lines.append(f"| `{prefix}{f.name}` | {kind} | {default_text} | {meaning} |")
    return lines


def explain_parse_error(message: str, keys: list[str] | None = None) -> str:
    """Turn jsonargparse's multi-line messages into one line that names the key and the fix (`keys`: the valid
    dotted keys, by default a run config's)."""
    unknown = re.search(
        r"(?:Group '(\w+)' does not accept option '([\w.-]+)'|does not accept option '([\w.-]+)'"
        r"|unrecognized arguments: --([\w.-]+)|Option '([\w.-]+)' is not accepted)",
        message,
    )
    if unknown:
        group, in_group, *others = unknown.groups()
        key = f"{group}.{in_group}" if group else next(k for k in others if k)
        return f"unknown config key '{key}'{_did_you_mean(key, keys or config_keys())}"
    wrong_type = re.search(
        r'Parser key "([\w.]+)":.*?Given value: (.*)$|Parser key "([\w.]+)":.*?Got value: (.*)$', message, re.S
    )
    if wrong_type:
        key = wrong_type.group(1) or wrong_type.group(3)
        value = (wrong_type.group(2) or wrong_type.group(4)).strip()
        choices = re.search(r"Literal\[(.*?)\]", message)
        expected = f"one of {choices.group(1)}" if choices else _type_name(key)
        return f"config key '{key}' expects {expected}, got {value!r}"
    return message.strip().splitlines()[0]


def _type_name(key: str) -> str:
    section, _, name = key.rpartition(".")
    cls = SECTION_NAMES.get(section, Config)
    annotation = {f.name: f.type for f in fields(cls)}.get(name, "a value of another type")
    return str(annotation).replace(" | None", " or null")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; choose one of: {', '.join(choices)}"


def _underscored(arg: str) -> str:
    """Accept `--train.max-steps` as well as `--train.max_steps`."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def resume_config(run_dir: str | Path, user_values: dict[str, Any]) -> Config:
    """The config of the run in `run_dir`, with the training keys the user changes for the rest of the run (the
    user's values come type-checked from parse_user_values)."""
    saved_file = Path(run_dir) / CONFIG_FILE
    if not saved_file.is_file():
        raise TinylmError(f"{run_dir} is not a tinylm run folder (no {CONFIG_FILE}); give the --out folder of a run")
    saved = read_yaml(saved_file)
    saved_config(saved, saved_file)  # a damaged config.yaml is named as such, not blamed on the user's values
    for section in ("data", "model"):
        for key, value in user_values.get(section, {}).items():
            if saved[section].get(key) != value:
                raise TinylmError(
                    f"--resume continues the same model on the same data, so {section}.{key} cannot change; "
                    "start a new run with another --out"
                )
    merged = {**saved, "out": str(run_dir)}
    for section, values in user_values.items():
        if isinstance(values, dict):
            merged[section] = {**saved.get(section, {}), **values}
    return config_from_dict(merged)
