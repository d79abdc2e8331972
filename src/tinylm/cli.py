"""The `tinylm` command: one subcommand per user step, each parsing its options and calling the library."""

from __future__ import annotations

import contextlib
import json
import sys
from argparse import SUPPRESS
from dataclasses import asdict, fields, is_dataclass, replace
from typing import Any, Literal, get_type_hints

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from tinylm.config import (
    API_KEY_VARIABLE,
    Config,
    DataConfig,
    ExportConfig,
    FinetuneConfig,
    LoadConfig,
    PipelineConfig,
    SampleConfig,
    ServeLimits,
    TrainConfig,
    check_config,
    check_serve_limits,
    field_docs,
    setting_from_text,
)
from tinylm.errors import TinylmError
from tinylm.recipes import (
    _underscored,
    config_keys,
    config_of_model,
    config_parser,
    explain_parse_error,
    parse_user_values,
    resolve_config,
)

MODEL_HELP = (
    "A run folder (`tinylm train`, `tinylm import`), a `tinylm finetune` output, a Hugging Face model folder or hub "
    "name, a .gguf file, or smollm2-135m-instruct."
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tinylm",
        exit_on_error=False,
        description="Build, train, evaluate and sample from small language models. "
        "`tinylm COMMAND --help` explains each command's options.",
    )
    commands = parser.add_subcommands(dest="command")

    commands.add_subcommand(
        "train", train_parser(), help="Train a model: `tinylm train RECIPE.yaml [--section.key VALUE ...]`."
    )

    prepare = ArgumentParser(exit_on_error=False, description="Download (or find) a dataset and tokenize it.")
    add_data_options(prepare)
    prepare.add_argument("--force-reload", action="store_true", help="Prepare again even if nothing changed.")
    commands.add_subcommand("prepare", prepare, help="Tokenize a dataset into token files (train does it too).")

    generate = ArgumentParser(exit_on_error=False, description="Continue a prompt with a trained model, streaming.")
    generate.add_argument("run_dir", type=str, help=MODEL_HELP)
    add_sampling_options(generate, GENERATE_OPTIONS)
    add_dataclass_options(generate, LoadConfig)
    commands.add_subcommand("generate", generate, help="Sample text from a trained run or any model `load` takes.")

    chat = ArgumentParser(exit_on_error=False, description="Talk with a model interactively; replies stream.")
    chat.add_argument("run_dir", type=str, help=MODEL_HELP)
    chat.add_argument("--system", type=str | None, default=None, help="A system message (chat-template models).")
    add_sampling_options(chat, CHAT_OPTIONS)
    add_dataclass_options(chat, LoadConfig)
    commands.add_subcommand("chat", chat, help="Chat with a run in the terminal (/help inside for commands).")

    evaluate = ArgumentParser(exit_on_error=False, description="Loss, perplexity and bits per byte on a data split.")
    evaluate.add_argument("model", type=str, help=MODEL_HELP)
    evaluate.add_argument(
        "--data", type=str | None, default=None, help="A source as for `tinylm prepare` (default: the run's data)."
    )
    evaluate.add_argument("--subset", type=str | None, default=None, help="A named part of --data (e.g. head10k).")
    evaluate.add_argument("--text-field", type=str, default="text", help="Field or column of --data holding the text.")
    evaluate.add_argument(
        "--errors",
        type=get_type_hints(DataConfig)["encoding_errors"] | None,
        default=None,
        help=f"{field_docs(DataConfig)['encoding_errors']} (default: the data's own setting, else strict)",
    )
    evaluate.add_argument("--split", type=str, default="val", help="Which split of the data: train, val or test.")
    evaluate.add_argument(
        "--block-size", type=int | None, default=None, help="Context per window (default: the model's, at most 1024)."
    )
    evaluate.add_argument(
        "--stride", type=int | None, default=None, help="Tokens between windows (default: --block-size, no overlap)."
    )
    evaluate.add_argument("--json", action="store_true", help='Print one JSON object: {"val": {"loss": ...}}.')
    add_dataclass_options(evaluate, LoadConfig)
    add_benchmark_options(evaluate)
    commands.add_subcommand("eval", evaluate, help="Evaluate a run, a fine-tune or a Hugging Face model on text.")

    serve = ArgumentParser(exit_on_error=False, description="An OpenAI-compatible API and a web playground.")
    serve.add_argument("run_dir", type=str, help=MODEL_HELP)
    serve.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on (default: this machine).")
    serve.add_argument("--port", type=int, default=8000, help="TCP port.")
    limit_docs = field_docs(ServeLimits)
    for limit in fields(ServeLimits):
        serve.add_argument(
            f"--{limit.name.replace('_', '-')}", type=int, default=limit.default, help=limit_docs[limit.name]
        )
    serve.add_argument(
        "--api-key",
        type=str | None,
        default=None,
        help=f"Answer 401 to requests without `Authorization: Bearer KEY` (default: ${API_KEY_VARIABLE}, else none).",
    )
    serve.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, mps.")
    add_dataclass_options(serve, LoadConfig)
    commands.add_subcommand("serve", serve, help="Serve a run over HTTP on localhost (`pip install 'tinylm[serve]'`).")

    info = ArgumentParser(
        exit_on_error=False, description="Parameters, FLOPs per token, KV-cache size and training memory of a model."
    )
    info.add_argument(
        "model", type=str, help="A model preset (e.g. gpt2-124m), depth:N (the depth dial), a recipe or a run folder."
    )
    info.add_argument("--batch-size", type=int | None, default=None, help="Sequences per step (default: the config's).")
    info.add_argument("--block-size", type=int | None, default=None, help="Context length (default: the model's).")
    info.add_argument(
        "--vocab-size", type=int | None, default=None, help="Vocabulary, for models that take it from the tokenizer."
    )
    info.add_argument(
        "--precision", type=Literal["fp32", "bf16", "fp16"], default="bf16", help="Activation and KV-cache precision."
    )
    info.add_argument(
        "--optimizer", type=Literal["adamw", "muon"] | None, default=None, help="Optimizer (default: the config's)."
    )
    info.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    commands.add_subcommand("info", info, help="What a model costs: parameters, FLOPs, KV cache, training memory.")

    export = ArgumentParser(exit_on_error=False, description="Write a run as a Hugging Face folder or a GGUF file.")
    export.add_argument("run_dir", type=str, help="Run folder written by `tinylm train` or `tinylm import`.")
    export.add_argument(
        "--to", type=Literal["hf", "gguf"], required=True, help="hf: a transformers folder; gguf: llama.cpp."
    )
    export.add_argument("out", type=str, help="The folder (hf) or .gguf file (gguf) to write.")
    add_dataclass_options(export, ExportConfig)
    export.add_argument("--overwrite", action="store_true", help="Replace what is already at OUT.")
    commands.add_subcommand("export", export, help="Export a run for transformers (hf) or llama.cpp (gguf).")

    import_ = ArgumentParser(exit_on_error=False, description="Turn a GPT-2 or Llama-family model into a tinylm run.")
    import_.add_argument(
        "source",
        type=str,
        help="A Hugging Face model folder, a .gguf file, a hub name (online) or smollm2-135m-instruct.",
    )
    import_.add_argument("--out", type=str, required=True, help="Run folder to write.")
    import_.add_argument("--overwrite", action="store_true", help="Replace the run already in the --out folder.")
    commands.add_subcommand("import", import_, help="Import a Hugging Face or GGUF model as a tinylm run.")

    commands.add_subcommand(
        "finetune",
        finetune_parser(),
        help="Fine-tune a Hugging Face model, GGUF file or tinylm run on instruction data (LoRA, QLoRA or full).",
    )

    report = ArgumentParser(
        exit_on_error=False, description="A report card (report.md and its loss plot) of one run or several."
    )
    report.add_argument("runs", type=str, nargs="+", help="Run folders or fine-tune outputs.")
    report.add_argument(
        "--out", type=str | None, default=None, help="Folder to write into (default: the run's; several runs need it)."
    )
    commands.add_subcommand("report", report, help="Write a run's report card, or several runs side by side.")

    commands.add_subcommand(
        "pipeline",
        pipeline_parser(),
        help="Tokenizer, pretraining, fine-tunes, evaluation, report card and export from one recipe, resumable.",
    )

    translate = ArgumentParser(exit_on_error=False, description="Answer a sequence with a trained seq2seq run.")
    translate.add_argument("run_dir", type=str, help="Run folder of `tinylm train configs/copy-task.yaml`.")
    translate.add_argument("sequence", type=str, help='Symbols separated by spaces, e.g. "3 1 4 1 5".')
    translate.add_argument("--attention", type=str | None, default=None, help="Also draw the cross-attention (PNG).")
    commands.add_subcommand("translate", translate, help="Copy or reverse a sequence with a trained seq2seq run.")
    return parser


def add_benchmark_options(evaluate: ArgumentParser) -> None:
    """`tinylm eval`'s benchmarks (lm-eval) and story-quality options."""
    evaluate.add_argument(
        "--tasks",
        type=str | None,
        default=None,
        help="lm-eval tasks, comma-separated: names (hellaswag,arc_easy), task YAML files or folders of them. "
        "Scores go to eval.json in the run folder (or --out).",
    )
    evaluate.add_argument("--num-fewshot", type=int | None, default=None, help="Examples shown before each question.")
    evaluate.add_argument("--limit", type=int | None, default=None, help="Score at most this many examples per task.")
    evaluate.add_argument("--batch-size", type=int, default=16, help="Sequences scored or generated at once.")
    evaluate.add_argument(
        "--include-path", type=list[str], default=[], help="Folders of task YAMLs whose tasks --tasks may name."
    )
    evaluate.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="Folder for eval.json / stories.json (default: MODEL when it is a run folder or fine-tune output).",
    )
    evaluate.add_argument(
        "--stories",
        action="store_true",
        help="Complete the TinyStories paper's 44 evaluation prompts (--limit: the first N) and score the stories.",
    )
    evaluate.add_argument("--samples", type=int, default=1, help="Completions per prompt (--stories).")
    evaluate.add_argument(
        "--reference", type=str | None, default=None, help="A model to measure each story's fluency (bits per byte)."
    )
    evaluate.add_argument(
        "--judge", type=str | None, default=None, help="An OpenAI-compatible endpoint that grades the stories."
    )
    evaluate.add_argument("--judge-model", type=str | None, default=None, help="The model --judge serves.")
    add_sampling_options(evaluate, CHAT_OPTIONS)


def finetune_parser() -> ArgumentParser:
    parser = ArgumentParser(
        exit_on_error=False,
        usage="tinylm finetune --base BASE --data DATA [--lora | --full] [--merge] [--out DIR] [--train.key VALUE ...]",
        description="Fine-tune on instruction data (or preference pairs, --method dpo); the held-out loss before and "
        "after is printed and recorded.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_class_arguments(FinetuneConfig, None, as_group=False)
    parser.add_argument("--lora", action="store_true", help="Train LoRA adapters (the default; --weights lora).")
    parser.add_argument("--full", action="store_true", help="Train every weight (--weights full).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the fine-tune already in the --out folder.")
    parser.add_argument("--resume", action="store_true", help="Continue the fine-tune in --out from its checkpoint.")
    return parser


# `prepare`'s options are DataConfig's fields, named as the field with dashes except these, which keep the shorter
# names users know; the first field, `source`, is the positional argument.
DATA_OPTION_NAMES = {"encoding_errors": "errors"}


def add_data_options(parser: ArgumentParser) -> None:
    """DataConfig's fields as `prepare`'s arguments: their types, defaults and docstrings (as help)."""
    docs, hints = field_docs(DataConfig), get_type_hints(DataConfig)
    source, *options = fields(DataConfig)
    parser.add_argument(source.name, type=hints[source.name], help=docs[source.name])
    for field in options:
        flag = "--" + DATA_OPTION_NAMES.get(field.name, field.name).replace("_", "-")
        parser.add_argument(flag, type=hints[field.name], default=field.default, help=docs[field.name])


def data_config_of(args) -> DataConfig:
    """The DataConfig that `prepare`'s arguments (from `add_data_options`) describe."""
    return DataConfig(
        **{field.name: args[DATA_OPTION_NAMES.get(field.name, field.name)] for field in fields(DataConfig)}
    )


def add_dataclass_options(parser: ArgumentParser, cls: type) -> None:
    """The fields of `cls` as `--field-name` options with their types, defaults and docstrings (as help)."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    for field in fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=hints[field.name], default=field.default, help=docs[field.name])


def dataclass_options(args, cls: type) -> Any:
    """The `cls` that `add_dataclass_options`' arguments describe."""
    return cls(**{field.name: args[field.name] for field in fields(cls)})


def load_options(args) -> dict[str, Any]:
    """`tinylm.load`'s keyword arguments from LoadConfig's options (`--quantize`)."""
    return asdict(dataclass_options(args, LoadConfig))


GENERATE_OPTIONS = [field.name for field in fields(SampleConfig)]
CHAT_OPTIONS = [name for name in GENERATE_OPTIONS if name != "prompt"]  # a chat's prompt is its conversation


def add_sampling_options(parser: ArgumentParser, names: list[str]) -> None:
    """SampleConfig's fields `names` as options (`--max-new-tokens`, ...) that override the run's `sample` config,
    their docstrings as help. They stay text for `setting_from_text`, which reads them as chat's /set does (no type
    for jsonargparse), and an unset one is absent (SUPPRESS), not a default."""
    docs = field_docs(SampleConfig)
    for name in names:
        meaning = f"{docs[name]} Unset: the run's sample.{name}."
        parser.add_argument(f"--{name.replace('_', '-')}", default=SUPPRESS, help=meaning)


def sampling_options(args, names: list[str]) -> dict[str, Any]:
    """The sampling options given on the command line, as values of their fields' types."""
    return {name: setting_from_text(SampleConfig, name, args[name]) for name in names if name in args}


def pipeline_parser() -> ArgumentParser:
    """`tinylm pipeline`'s options, for --help: the command itself reads them with `pipeline_arguments`, since a
    recipe key may be set at any depth (--sft.train.max_steps)."""
    keys = {}
    for name, meaning in field_docs(PipelineConfig).items():
        section = get_type_hints(PipelineConfig)[name]
        inner = field_docs(section).items() if is_dataclass(section) else []
        keys.update({f"{name}.{key}": text for key, text in inner} or {name: meaning})
    listed = "; ".join(f"{key}: {meaning.rstrip('.')}" for key, meaning in keys.items())
    parser = ArgumentParser(
        exit_on_error=False,
        usage="tinylm pipeline RECIPE.yaml [--out DIR] [--from STAGE] [--overwrite] [--KEY VALUE ...]",
        description="Run a pipeline recipe: tokenizer, pretrain, sft, preference, rl, eval, report, export, each "
        "into a folder of --out. A stage done already is skipped, an interrupted one continued. Any recipe key is set "
        f"with --KEY VALUE, dotted, the value read as YAML (e.g. --sft.train.max_steps 50). The keys: {listed}.",
    )
    parser.add_argument("recipe", type=str, help="A pipeline recipe (configs/pipeline-*.yaml).")
    parser.add_argument("--out", type=str | None, default=None, help=field_docs(PipelineConfig)["out"])
    parser.add_argument("--from", type=str | None, default=None, help="Run this stage and every later one again.")
    parser.add_argument("--overwrite", action="store_true", help="Run every stage again, replacing its output.")
    return parser


def pipeline_arguments(args: list[str]) -> tuple[str, dict[str, Any], bool, str | None]:
    """(recipe, dotted overrides, --overwrite, --from STAGE) of `tinylm pipeline`'s arguments: `--KEY VALUE` or
    `--KEY=VALUE` sets any recipe key (--out DIR is the key `out`), the value read as YAML (50, null, [a, b]) or
    else taken as text."""
    recipe, overrides, overwrite, start_from = None, {}, False, None
    remaining = iter(args)
    for arg in remaining:
        if arg == "--overwrite":
            overwrite = True
            continue
        if not arg.startswith("--"):
            if recipe is not None:
                raise TinylmError(f"unexpected argument {arg!r}: give one recipe, then --KEY VALUE options")
            recipe = arg
            continue
        name, equals, text = arg.partition("=")
        if not equals:
            text = next(remaining, None)
            if text is None:
                raise TinylmError(f"{name} needs a value")
        if name == "--from":
            start_from = text
            continue
        try:
            overrides[name[2:].replace("-", "_")] = yaml.safe_load(text)
        except yaml.YAMLError:
            overrides[name[2:].replace("-", "_")] = text
    if recipe is None:
        raise TinylmError("give a pipeline recipe: tinylm pipeline RECIPE.yaml (see configs/pipeline-*.yaml)")
    return recipe, overrides, overwrite, start_from


def train_parser() -> ArgumentParser:
    parser = config_parser()
    parser.usage = (
        "tinylm train RECIPE.yaml [--out DIR] [--overwrite] [--section.key VALUE ...]\n"
        "       tinylm train --resume RUN_DIR [--train.key VALUE ...]"
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace the run already in the --out folder.")
    parser.add_argument(
        "--resume", type=str | None, default=None, help="Continue the run in this folder from its latest checkpoint."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
            return run_train(argv[1:])
        if argv[:1] == ["finetune"] and not {"-h", "--help"} & set(argv):
            return run_finetune(argv[1:])
        if argv[:1] == ["pipeline"] and not {"-h", "--help"} & set(argv):
            return run_pipeline_recipe(argv[1:])
        try:
            args = parser.parse_args(argv)
        except Exception as error:  # jsonargparse reports every parse problem as ArgumentError or ValueError
            raise TinylmError(explain_parse_error(str(error))) from None
        commands = {
            "prepare": run_prepare,
            "generate": run_generate,
            "eval": run_eval,
            "chat": run_chat,
            "serve": run_serve,
            "info": run_info,
            "export": run_export,
            "import": run_import,
            "translate": run_translate,
            "report": run_report,
        }
        return commands[args.command](args[args.command])
    except TinylmError as error:
        print(f"tinylm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130


def run_train(args: list[str]) -> int:
    from tinylm.recipes import resume_config
    from tinylm.training import train

    values = parse_user_values(train_parser(), args)
    overwrite = values.pop("overwrite", False)
    resume = values.pop("resume", None)
    if resume:
        result = train(resume_config(resume, values), resume=True)
    else:
        result = train(resolve_config(values), overwrite=overwrite)
    if not result.is_main:
        return 0
    print(
        f"\nbest val loss {result.best_val_loss:.4f} after {result.steps} steps in {result.elapsed_s:.1f}s; "
        f"run saved in {result.run_dir}\n--- sample ---\n{result.sample}"
    )
    return 0


def run_prepare(args) -> int:
    from tinylm.data.prepare import prepare

    config = data_config_of(args)
    check_config(Config(data=config))
    data = prepare(config, force=args.force_reload)
    meta = data.meta
    print(f"{data.folder}: {meta['tokenizer']['spec']} tokenizer, vocabulary {meta['vocab_size']:,}, {meta['dtype']}")
    for split, info in meta["splits"].items():
        print(
            f"  {split}: {info['tokens']:,} tokens in {len(info['files'])} shard(s), {info['documents']:,} documents, "
            f"{info['bytes']:,} bytes ({info['bytes'] / info['tokens']:.2f} bytes per token)"
        )
    return 0


def run_generate(args) -> int:
    from tinylm.run import load

    options = sampling_options(args, GENERATE_OPTIONS)
    run = load(args.run_dir, **load_options(args))
    prompt = options.pop("prompt", run.sampling().prompt)
    pieces = run.stream(prompt, **options)
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    from tinylm.chat import ChatSession, chat_loop
    from tinylm.run import load

    options = sampling_options(args, CHAT_OPTIONS)
    run = load(args.run_dir, **load_options(args))
    sampling = run.sampling(**options)
    if "seed" not in options:  # a chat should not answer the same question the same way every time
        sampling.seed = None
    with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    chat_loop(ChatSession(run, sampling, args.system))
    return 0


def run_eval(args) -> int:
    from tinylm.run import load

    if args.tasks is not None and args.stories:
        raise TinylmError("--tasks and --stories are separate evaluations; run one, then the other")
    if args.tasks is not None:
        return run_benchmarks(args)
    if args.stories:
        return run_stories(args)
    run = load(args.model, **load_options(args))
    data = run.config.data if run.config else None
    if args.data is not None:
        data = DataConfig(source=args.data, subset=args.subset, text_field=args.text_field)
    if data is not None and args.errors is not None:
        data = replace(data, encoding_errors=args.errors)
    result = run.evaluate(args.split, data, args.stride, args.block_size)
    if args.json:
        print(json.dumps({args.split: result.to_dict()}))
    else:
        print(
            f"{args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, "
            f"{result.bpb:.4f} bits per byte, over {result.tokens:,} tokens ({result.bytes:,} bytes)"
        )
    return 0


def run_benchmarks(args) -> int:
    try:
        from tinylm.harness import benchmark, save_benchmarks
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":
            raise
        raise TinylmError("benchmarks need lm-evaluation-harness: pip install 'tinylm[eval]'") from None
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    result = benchmark(args.model, tasks, args.num_fewshot, args.limit, args.batch_size, args.include_path)
    saved = save_benchmarks(result, args.model, args.out)
    print(json.dumps(result.record()) if args.json else result.table())
    say_where_saved("benchmark scores", saved)
    return 0


def run_stories(args) -> int:
    from tinylm.stories import evaluate_stories, save_stories

    result = evaluate_stories(
        args.model,
        args.samples,
        sampling_options(args, CHAT_OPTIONS),
        args.reference,
        args.judge,
        args.judge_model,
        args.limit,
        args.batch_size,
    )
    saved = save_stories(result, args.model, args.out)
    print(json.dumps(result.record()) if args.json else result.summary())
    say_where_saved("stories and scores", saved)
    return 0


def say_where_saved(what: str, saved) -> None:
    """On stderr, so that --json output stays one object: where an evaluation's results went, or why nowhere."""
    where = f"saved in {saved}" if saved else "not saved: MODEL is not a run folder; give --out DIR to keep them"
    print(f"{what} {where}", file=sys.stderr)


def run_serve(args) -> int:
    from tinylm.serve import serve

    if not 0 <= args.port <= 65535:
        raise TinylmError(f"--port must be a TCP port, 0 to 65535, not {args.port}")
    limits = ServeLimits(**{limit.name: args[limit.name] for limit in fields(ServeLimits)})
    check_serve_limits(limits)
    serve(args.run_dir, args.host, args.port, limits, args.device, args.api_key, **load_options(args))
    return 0


def run_info(args) -> int:
    from tinylm.model.budget import format_budget, model_budget

    config = config_of_model(args.model)
    model_changes = {"block_size": args.block_size, "vocab_size": args.vocab_size}
    train_changes = {"batch_size": args.batch_size, "optimizer": args.optimizer}
    config = replace(
        config,
        model=replace(config.model, **{key: value for key, value in model_changes.items() if value is not None}),
        train=replace(config.train, **{key: value for key, value in train_changes.items() if value is not None}),
    )
    check_config(config)
    if config.model.vocab_size is None:
        raise TinylmError(
            f"{args.model} takes its vocabulary from the tokenizer; give --vocab-size (e.g. 65 for Tiny Shakespeare "
            "characters, 50257 for gpt2)"
        )
    budget = model_budget(
        config.model, config.train.batch_size, args.precision, config.train.optimizer, config.train.ema_decay > 0
    )
    dial = depth_dial(config) if config.model.depth is not None else None
    if args.json:
        print(json.dumps({**budget.to_dict(), **({"depth_dial": dial} if dial else {})}))
        return 0
    print(format_budget(args.model, config.model, budget))
    if dial:
        print(
            f"depth dial {config.model.depth}: n_layer {dial['n_layer']}, n_embd {dial['n_embd']}, n_head "
            f"{dial['n_head']}; train.learning_rate {dial['learning_rate']:g}, train.batch_size {dial['batch_size']}, "
            f"train.max_steps {dial['max_steps']:,} ({dial['tokens']:,} tokens)"
        )
    return 0


def depth_dial(config: Config) -> dict[str, int | float]:
    """What model.depth set, as the run will use it."""
    model, train = config.model, config.train
    return {
        "n_layer": model.n_layer,
        "n_embd": model.n_embd,
        "n_head": model.n_head,
        "learning_rate": train.learning_rate,
        "batch_size": train.batch_size,
        "max_steps": train.max_steps,
        "tokens": train.max_steps * train.batch_size * model.block_size,
    }


def run_export(args) -> int:
    from tinylm.gguf_export import export_gguf
    from tinylm.hf import export_hf

    quant = dataclass_options(args, ExportConfig).quant
    if args.to == "hf" and quant != ExportConfig.quant:
        raise TinylmError(f"--quant {quant} is for --to gguf; a Hugging Face export keeps float32 weights")
    if args.to == "hf":
        out = export_hf(args.run_dir, args.out, overwrite=args.overwrite)
    else:
        out = export_gguf(args.run_dir, args.out, quant, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def run_import(args) -> int:
    from tinylm.hf import import_model

    result = import_model(args.source, args.out, overwrite=args.overwrite)
    model = result.config
    print(
        f"imported {args.source} into {result.run_dir}: {model.n_layer} layers, {model.n_embd} wide, "
        f"{model.positions} positions, {model.norm}, {model.mlp}; try `tinylm generate {result.run_dir}`"
    )
    return 0


def run_finetune(args: list[str]) -> int:
    from tinylm.training import finetune

    try:
        values = finetune_parser().parse_args(_bare_switches_on([_underscored(arg) for arg in args])).as_dict()
    except Exception as error:  # jsonargparse reports every parse problem as ArgumentError or ValueError
        raise TinylmError(explain_parse_error(str(error), config_keys(FinetuneConfig))) from None
    values.pop("config", None)
    lora, full, overwrite, resume = (values.pop(key) for key in ("lora", "full", "overwrite", "resume"))
    if lora and full:
        raise TinylmError("--lora and --full exclude each other; choose one")
    if full:
        values["weights"] = "full"
    config = FinetuneConfig(**{**values, "train": TrainConfig(**values["train"])})
    result = finetune(config, overwrite=overwrite, resume=resume)
    accuracy = ""
    if result.answer_accuracy_before is not None:
        accuracy = (
            f", answer accuracy {result.answer_accuracy_before:.1%} before, {result.answer_accuracy_after:.1%} after"
        )
    if result.preference_accuracy_before is not None:
        accuracy = (
            f", preference accuracy {result.preference_accuracy_before:.1%} before, "
            f"{result.preference_accuracy_after:.1%} after, reward margin {result.reward_margin_before:.4f} before, "
            f"{result.reward_margin_after:.4f} after"
        )
    print(
        f"\nheld-out loss {result.held_out_loss_before:.4f} before, {result.held_out_loss_after:.4f} after "
        f"{result.steps} steps{accuracy} ({result.trainable_parameters:,} parameters trained, "
        f"{result.elapsed_s:.1f}s); saved in {result.out}"
    )
    return 0


def _bare_switches_on(args: list[str]) -> list[str]:
    """`--merge` alone means `--merge true` (jsonargparse wants a value after every boolean option)."""
    switches = {f"--{f.name}" for f in fields(FinetuneConfig) if f.type == "bool"}
    result = []
    for arg, following in zip(args, [*args[1:], None]):
        result.append(arg)
        if arg in switches and (following or "").lower() not in ("true", "false"):
            result.append("true")
    return result


def run_pipeline_recipe(args: list[str]) -> int:
    from tinylm.pipeline import load_pipeline_config, run_pipeline

    recipe, overrides, overwrite, start_from = pipeline_arguments(args)
    result = run_pipeline(load_pipeline_config(recipe, overrides), overwrite, start_from)
    print(f"\n{result.table()}\npipeline saved in {result.out}")
    return 0


def run_report(args) -> int:
    from tinylm.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


def run_translate(args) -> int:
    from tinylm.copy_task import load_copy_task

    run = load_copy_task(args.run_dir)
    print(run.translate(args.sequence))
    if args.attention:
        print(f"cross-attention drawn in {run.draw_attention(args.sequence, args.attention)}", file=sys.stderr)
    return 0
