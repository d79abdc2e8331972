"""Everything a run is made of, as dataclasses: data, model, training and sampling.

A recipe is a YAML file with one section per dataclass (see `configs/`). The command line overrides any key with a
dotted option (`--train.max_steps 500`, or `--train.max-steps 500`). The parsing, type checking and `--help` text come
from jsonargparse, which reads these dataclasses and their attribute docstrings; the fully resolved config is saved as
`config.yaml` in every run folder.

Model presets are data: a named set of `ModelConfig` fields (`MODEL_PRESETS`). A recipe picks one with `model.preset`,
and any model key it sets besides wins over the preset.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from tinylm.errors import TinylmError

set_parsing_settings(docstring_parse_attribute_docstrings=True)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    source: str = "tinyshakespeare"
    """A dataset (tinyshakespeare, tinystories, tinystories-v1, wikitext2), a .txt/.jsonl/.json/.parquet file or a
    folder of them, or hf:owner/name[:config] for a Hugging Face dataset."""
    subset: str | None = None
    """A named part of a dataset, e.g. tinystories head10k (the first 10k lines, what the offline mirror holds)."""
    tokenizer: str = "char"
    """`char`; `bpe:N` (byte-level BPE with N tokens trained on the train split); `gpt2` (tiktoken); `hf:NAME` (a
    Hugging Face tokenizer); or the path of a tokenizer.json."""
    text_field: str = "text"
    """Field (.jsonl, .json, hf:) or column (.parquet) that holds each document's text."""
    val_fraction: float = 0.1
    """Share held out for validation when the source has no validation split of its own."""
    data_dir: str | None = None
    """Folder for prepared token files (default: the tinylm cache, `$TINYLM_CACHE` or ~/.cache/tinylm)."""
    num_proc: int | None = None
    """Tokenizer processes (default: every available core)."""
    shard_tokens: int = 100_000_000
    """Most tokens in one shard file."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Integer type of the token files; auto picks uint16 when the vocabulary fits in it."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """`strict` stops at bytes that are not UTF-8; `replace` puts U+FFFD in their place and goes on."""


@dataclass
class ModelConfig:
    """The network. `preset` names a set of these fields; keys given beside it override the preset."""

    preset: str | None = None
    """A named model (`bigram`, `nanogpt-shakespeare-char`, ...), or null to set every field here."""
    arch: Literal["gpt", "bigram", "seq2seq"] = "gpt"
    """`gpt`: decoder-only Transformer. `bigram`: one embedding lookup from token to next-token logits. `seq2seq`:
    the encoder-decoder Transformer (n_layer encoder and n_layer decoder layers), trained on the `task` section."""
    vocab_size: int | None = None
    """Size of the token vocabulary; null takes it from the tokenizer."""
    block_size: int = 256
    """Context length: the most tokens the model sees at once."""
    n_layer: int = 6
    """Number of Transformer blocks."""
    n_head: int = 6
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 384
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual branches while training."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output layer (counted once in the parameter count)."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    max_steps: int = 2000
    """Optimizer steps to run."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """`adamw`, or `muon`: Muon on the hidden matrices and AdamW (learning_rate) on embeddings, norms and biases."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate, reached at the end of warm-up."""
    muon_lr: float = 0.02
    """Peak Muon learning rate (optimizer: muon), on the same schedule."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays every learning rate to its peak * min_lr_ratio at max_steps."""
    warmup_steps: int = 100
    """Steps of linear warm-up from zero."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases, norms or position embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    eval_interval: int = 250
    """Evaluate on the validation batches every this many steps (and at the last step)."""
    eval_batches: int = 20
    """Fixed validation batches per evaluation (the same batches every time)."""
    log_interval: int = 10
    """Write a training record to metrics.jsonl every this many steps."""
    seed: int = 1337
    """Seeds weights, batches and dropout: the same seed gives the same run."""
    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), or a torch device such as `cpu` or `cuda:1`."""
    threads: int | None = None
    """CPU threads for torch (null: torch's default, one per core)."""


@dataclass
class SampleConfig:
    """Text generation defaults, used after training and by `tinylm generate`."""

    prompt: str = "\n"
    """Text the model continues."""
    max_new_tokens: int = 500
    """Tokens to generate."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token every time."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens (null: all)."""
    seed: int = 1337
    """Seed of the sampler: the same seed and prompt give the same text."""


@dataclass
class TaskConfig:
    """The synthetic sequence-to-sequence task a `seq2seq` model learns (model.arch: seq2seq; other models ignore it).

    Sequences of symbols `0 .. symbols-1` with random lengths; the model reads one and writes it back (`copy`) or
    backwards (`reverse`). Held-out sequences are never trained on."""

    kind: Literal["copy", "reverse"] = "copy"
    """`copy`: write the sequence as it is; `reverse`: write it last symbol first."""
    symbols: int = 10
    """Distinct symbols a sequence is made of."""
    min_length: int = 1
    """Shortest sequence."""
    max_length: int = 16
    """Longest sequence; model.block_size must be at least max_length + 1 (room for EOS and BOS)."""
    val_sequences: int = 1000
    """Distinct held-out sequences that measure exact-sequence accuracy (and are never trained on)."""
    label_smoothing: float = 0.0
    """Share of each target's probability spread evenly over the vocabulary in the training loss (the paper: 0.1)."""
    stop_accuracy: float | None = None
    """Stop training at the first evaluation whose held-out exact-sequence accuracy reaches this (null: never)."""


@dataclass
class Config:
    """A whole run: one section per part, and the folder it writes."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    out: str = "out/run"
    """Run folder: config, tokenizer, checkpoints, metrics and samples go here."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The teaching baseline: each token looks up the logits of the next one; no context at all.
    "bigram": {"arch": "bigram", "n_layer": 0, "n_head": 1, "n_embd": 0, "tie_embeddings": False},
    # nanoGPT's config/train_shakespeare_char.py.
    "nanogpt-shakespeare-char": {
        "arch": "gpt",
        "block_size": 256,
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "dropout": 0.2,
        "bias": False,
    },
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


def parse_user_values(parser: ArgumentParser, args: list[str]) -> dict[str, Any]:
    """The keys the user set (in the recipe or on the command line), type-checked, without defaults filled in."""
    if args and not args[0].startswith("-"):
        args = ["--config", *args]  # `tinylm train RECIPE ...`: the recipe is the first positional argument
    if len(args) >= 2 and args[0] == "--config" and not Path(args[1]).is_file():
        raise TinylmError(f"recipe not found: {args[1]} (see configs/ for the recipes that ship with tinylm)")
    args = [_underscored(arg) for arg in args]
    try:
        values = parser.parse_args(args, defaults=False).as_dict()
    except Exception as error:  # jsonargparse reports every parse problem as ArgumentError or ValueError
        raise TinylmError(explain_parse_error(str(error))) from None
    values.pop("config", None)
    return values


def resolve_config(user_values: dict[str, Any], parser: ArgumentParser | None = None) -> Config:
    """Layer defaults, the model preset and the user's values, and check the result."""
    for section, value in user_values.items():
        if section in SECTION_NAMES and not isinstance(value, dict):
            raise TinylmError(f"config section '{section}' must be a mapping of keys to values, not {value!r}")
    model = user_values.get("model", {})
    preset = model.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise TinylmError(f"unknown model preset '{preset}'{_did_you_mean(preset, MODEL_PRESETS)}")
        user_values = {**user_values, "model": {**MODEL_PRESETS[preset], **model}}
    parser = parser or config_parser()
    try:
        config = parser.instantiate(parser.parse_object(user_values))
    except Exception as error:
        raise TinylmError(explain_parse_error(str(error))) from None
    config = Config(**{key: value for key, value in vars(config).items() if key in _field_names(Config)})
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Reject values that type-check but cannot work, with the fix in the message."""
    model, train, data = config.model, config.train, config.data
    if model.arch in ("gpt", "seq2seq"):
        if model.n_layer < 1 or model.n_embd < 1 or model.n_head < 1:
            raise TinylmError(
                f"model.n_layer, model.n_head and model.n_embd must be at least 1 for a {model.arch} model"
            )
        if model.n_embd % model.n_head:
            raise TinylmError(f"model.n_embd ({model.n_embd}) must be a multiple of model.n_head ({model.n_head})")
    if model.block_size < 1:
        raise TinylmError("model.block_size must be at least 1")
    if not 0.0 <= model.dropout < 1.0:
        raise TinylmError(f"model.dropout must be in [0, 1), not {model.dropout}")
    if not 0.0 < data.val_fraction < 1.0:
        raise TinylmError(f"data.val_fraction must be between 0 and 1, not {data.val_fraction}")
    if data.shard_tokens < 1:
        raise TinylmError(f"data.shard_tokens must be at least 1, not {data.shard_tokens}")
    if data.num_proc is not None and data.num_proc < 1:
        raise TinylmError(f"data.num_proc must be at least 1, not {data.num_proc}")
    for key in ("max_steps", "batch_size", "eval_interval", "eval_batches", "log_interval"):
        if getattr(train, key) < 1:
            raise TinylmError(f"train.{key} must be at least 1, not {getattr(train, key)}")
    for key in ("learning_rate", "muon_lr"):
        if getattr(train, key) <= 0:
            raise TinylmError(f"train.{key} must be positive, not {getattr(train, key)}")
    if config.sample.temperature < 0:
        raise TinylmError(f"sample.temperature must be 0 or more, not {config.sample.temperature}")
    if model.arch == "seq2seq":
        check_task_config(config)


def check_task_config(config: Config) -> None:
    task = config.task
    if task.symbols < 2:
        raise TinylmError(f"task.symbols must be at least 2, not {task.symbols}")
    if not 1 <= task.min_length <= task.max_length:
        raise TinylmError(
            f"task.min_length ({task.min_length}) must be at least 1 and at most task.max_length ({task.max_length})"
        )
    if config.model.block_size < task.max_length + 1:
        raise TinylmError(
            f"model.block_size ({config.model.block_size}) must be at least task.max_length + 1 "
            f"({task.max_length + 1}): a sequence plus its EOS or BOS"
        )
    distinct = sum(task.symbols**length for length in range(task.min_length, task.max_length + 1))
    if not 1 <= task.val_sequences <= distinct // 2:
        raise TinylmError(
            f"task.val_sequences ({task.val_sequences}) must be between 1 and half the {distinct} distinct sequences, "
            "so that most are left to train on; lower it or raise task.max_length or task.symbols"
        )
    if not 0.0 <= task.label_smoothing < 1.0:
        raise TinylmError(f"task.label_smoothing must be in [0, 1), not {task.label_smoothing}")
    if task.stop_accuracy is not None and not 0.0 < task.stop_accuracy <= 1.0:
        raise TinylmError(f"task.stop_accuracy must be in (0, 1] or null, not {task.stop_accuracy}")


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set."""
    keys = []
    for f in fields(cls):
        if f.name in SECTION_NAMES:
            keys += config_keys(SECTION_NAMES[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


SECTION_NAMES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "task": TaskConfig,
}


def explain_parse_error(message: str) -> str:
    """Turn jsonargparse's multi-line messages into one line that names the key and the fix."""
    unknown = re.search(
        r"(?:Group '(\w+)' does not accept option '([\w.-]+)'|does not accept option '([\w.-]+)'"
        r"|unrecognized arguments: --([\w.-]+)|Option '([\w.-]+)' is not accepted)",
        message,
    )
    if unknown:
        group, in_group, *others = unknown.groups()
        key = f"{group}.{in_group}" if group else next(k for k in others if k)
        return f"unknown config key '{key}'{_did_you_mean(key, config_keys())}"
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
