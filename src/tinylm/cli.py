"""The `tinylm` command: one subcommand per user step, each parsing its options and calling the library."""

from __future__ import annotations

import json
import sys

from jsonargparse import ArgumentParser

from tinylm.config import (
    Config,
    DataConfig,
    check_config,
    config_parser,
    explain_parse_error,
    parse_user_values,
    resolve_config,
)
from tinylm.errors import TinylmError


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
    prepare.add_argument("source", type=str, help="A dataset name (tinyshakespeare) or a UTF-8 .txt file.")
    prepare.add_argument("--tokenizer", type=str, default="char", help="`char` or `bpe:N` (e.g. bpe:4096).")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="Share of the text, from its end, held out.")
    prepare.add_argument("--data-dir", type=str | None, default=None, help="Where token files go (default: cache).")
    prepare.add_argument("--force-reload", action="store_true", help="Prepare again even if nothing changed.")
    commands.add_subcommand("prepare", prepare, help="Tokenize a dataset into token files (train does it too).")

    generate = ArgumentParser(exit_on_error=False, description="Continue a prompt with a trained model, streaming.")
    generate.add_argument("run_dir", type=str, help="Run folder written by `tinylm train`.")
    generate.add_argument("--prompt", type=str | None, default=None, help="Text to continue (default: the run's).")
    generate.add_argument("--max-new-tokens", type=int | None, default=None, help="Tokens to generate.")
    generate.add_argument("--temperature", type=float | None, default=None, help="0 is greedy; higher is more varied.")
    generate.add_argument("--top-k", type=int | None, default=None, help="Sample among the k likeliest tokens only.")
    generate.add_argument("--seed", type=int | None, default=None, help="Same seed and prompt, same text.")
    commands.add_subcommand("generate", generate, help="Sample text from a trained run.")

    evaluate = ArgumentParser(exit_on_error=False, description="Loss, perplexity and bits per byte on a data split.")
    evaluate.add_argument("run_dir", type=str, help="Run folder written by `tinylm train`.")
    evaluate.add_argument("--split", type=str, default="val", help="Which split of the run's data: train or val.")
    evaluate.add_argument("--json", action="store_true", help='Print one JSON object: {"val": {"loss": ...}}.')
    commands.add_subcommand("eval", evaluate, help="Evaluate a trained run on its validation data.")
    return parser


def train_parser() -> ArgumentParser:
    parser = config_parser()
    parser.usage = "tinylm train RECIPE.yaml [--out DIR] [--overwrite] [--section.key VALUE ...]"
    parser.add_argument("--overwrite", action="store_true", help="Replace the run already in the --out folder.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
            return run_train(argv[1:])
        try:
            args = parser.parse_args(argv)
        except Exception as error:  # jsonargparse reports every parse problem as ArgumentError or ValueError
            raise TinylmError(explain_parse_error(str(error))) from None
        return {"prepare": run_prepare, "generate": run_generate, "eval": run_eval}[args.command](args[args.command])
    except TinylmError as error:
        print(f"tinylm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130


def run_train(args: list[str]) -> int:
    from tinylm.training.trainer import train

    values = parse_user_values(train_parser(), args)
    overwrite = values.pop("overwrite", False)
    result = train(resolve_config(values), overwrite=overwrite)
    print(
        f"\nbest val loss {result.best_val_loss:.4f} after {result.steps} steps in {result.elapsed_s:.1f}s; "
        f"run saved in {result.run_dir}\n--- sample ---\n{result.sample}"
    )
    return 0


def run_prepare(args) -> int:
    from tinylm.data.prepare import prepare

    config = DataConfig(
        source=args.source, tokenizer=args.tokenizer, val_fraction=args.val_fraction, data_dir=args.data_dir
    )
    check_config(Config(data=config))
    data = prepare(config, force=args.force_reload)
    print(f"{data.folder}: {data.meta['tokenizer']['spec']} tokenizer, vocabulary {data.meta['vocab_size']:,}")
    for split, info in data.meta["splits"].items():
        print(
            f"  {split}: {info['tokens']:,} tokens from {info['bytes']:,} bytes ({info['bytes'] / info['tokens']:.2f} "
            "bytes per token)"
        )
    return 0


def run_generate(args) -> int:
    from tinylm.run import load

    run = load(args.run_dir)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    prompt = run.config.sample.prompt if args.prompt is None else args.prompt
    sys.stdout.write(prompt)
    for piece in run.stream(prompt, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_eval(args) -> int:
    from tinylm.run import load

    if args.split not in ("train", "val"):
        raise TinylmError(f"unknown split '{args.split}'; choose train or val")
    result = load(args.run_dir).evaluate(args.split)
    if args.json:
        print(json.dumps({args.split: result.to_dict()}))
    else:
        print(
            f"{args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, "
            f"{result.bpb:.4f} bits per byte, over {result.tokens:,} tokens"
        )
    return 0
