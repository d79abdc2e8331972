"""The `tinylm` command: one subcommand per user step, each parsing its options and calling the library."""

from __future__ import annotations

import json
import sys
from typing import Literal

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
    prepare.add_argument(
        "source",
        type=str,
        help="A dataset (tinyshakespeare, tinystories, tinystories-v1, wikitext2), a .txt/.jsonl/.json/.parquet file "
        "or folder, or hf:owner/name[:config].",
    )
    prepare.add_argument("--subset", type=str | None, default=None, help="A named part of a dataset (e.g. head10k).")
    prepare.add_argument(
        "--tokenizer", type=str, default="char", help="char, bpe:N, gpt2, hf:NAME or a tokenizer.json."
    )
    prepare.add_argument("--text-field", type=str, default="text", help="Field or column holding each document.")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="Share held out when there is no val split.")
    prepare.add_argument("--data-dir", type=str | None, default=None, help="Where token files go (default: cache).")
    prepare.add_argument("--num-proc", type=int | None, default=None, help="Tokenizer processes (default: all cores).")
    prepare.add_argument("--shard-tokens", type=int, default=100_000_000, help="Most tokens per shard file.")
    prepare.add_argument(
        "--token-dtype", type=Literal["auto", "uint16", "uint32"], default="auto", help="Integer type of token files."
    )
    prepare.add_argument(
        "--errors",
        type=Literal["strict", "replace"],
        default="strict",
        help="On bytes that are not UTF-8: stop (strict) or replace them with U+FFFD.",
    )
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
    evaluate.add_argument("--split", type=str, default="val", help="Which split of the run's data: train, val or test.")
    evaluate.add_argument("--json", action="store_true", help='Print one JSON object: {"val": {"loss": ...}}.')
    commands.add_subcommand("eval", evaluate, help="Evaluate a trained run on its validation data.")

    translate = ArgumentParser(exit_on_error=False, description="Answer a sequence with a trained seq2seq run.")
    translate.add_argument("run_dir", type=str, help="Run folder of `tinylm train configs/copy-task.yaml`.")
    translate.add_argument("sequence", type=str, help='Symbols separated by spaces, e.g. "3 1 4 1 5".')
    translate.add_argument("--attention", type=str | None, default=None, help="Also draw the cross-attention (PNG).")
    commands.add_subcommand("translate", translate, help="Copy or reverse a sequence with a trained seq2seq run.")
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
        return {"prepare": run_prepare, "generate": run_generate, "eval": run_eval, "translate": run_translate}[
            args.command
        ](args[args.command])
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
        source=args.source,
        subset=args.subset,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        data_dir=args.data_dir,
        num_proc=args.num_proc,
        shard_tokens=args.shard_tokens,
        token_dtype=args.token_dtype,
        encoding_errors=args.errors,
    )
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

    result = load(args.run_dir).evaluate(args.split)
    if args.json:
        print(json.dumps({args.split: result.to_dict()}))
    else:
        print(
            f"{args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, "
            f"{result.bpb:.4f} bits per byte, over {result.tokens:,} tokens"
        )
    return 0


def run_translate(args) -> int:
    from tinylm.copy_task import load_copy_task

    run = load_copy_task(args.run_dir)
    print(run.translate(args.sequence))
    if args.attention:
        print(f"cross-attention drawn in {run.draw_attention(args.sequence, args.attention)}", file=sys.stderr)
    return 0
