"""Which int8 library decodes faster on this CPU: torch's own dynamic quantization (what `--quantize int8` uses) or
torchao's weight-only int8 (`Int8WeightOnlyConfig`, eager), each beside float32, on the same trained llama-style run
as bench/decode_llama_cpp.py: greedy tokens per second per thread count, and bits per byte on held-out text.

torchao is not a tinylm dependency; install it for this comparison without letting it touch torch:
    pip install --no-deps torchao==0.18.0
    python bench/int8_cpu.py --threads 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import warnings
from pathlib import Path

import torch
from decode_llama_cpp import held_out_windows, tokens_per_second, torch_bits_per_byte, trained_run

import tinylm
from tinylm.config import SampleConfig
from tinylm.generate import generate_tokens
from tinylm.quantize import quantize_int8


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained llama-style run (default: bench/decode_llama_cpp.py's).")
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-bytes", type=int, default=60_000)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # torch's notices about eager quantization, torchao's about its kernels

    run = tinylm.load(args.run or trained_run(args.train_steps), device="cpu")
    models = {"fp32": run.model, "torch_dynamic_int8": quantize_int8(copy.deepcopy(run.model))}
    if (ao := torchao_int8(run.model)) is not None:
        models["torchao_int8_weight_only"] = ao
    windows, text_bytes = held_out_windows(run, args.eval_bytes, args.window)
    prompt = run.tokenizer.encode("Once upon a time, there was a little")
    sampling = SampleConfig(max_new_tokens=args.new_tokens, temperature=0, top_k=None)
    report = {
        name: {"bits_per_byte": round(torch_bits_per_byte(m, windows, text_bytes), 4)} for name, m in models.items()
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, model in models.items():
            decode = lambda model=model: list(generate_tokens(model, [prompt], sampling))  # noqa: E731
            report[name][f"tokens_per_s_{threads}_threads"] = round(
                tokens_per_second(decode, args.new_tokens, args.rounds), 1
            )
    if "torchao_int8_weight_only" not in models:
        report["torchao_int8_weight_only"] = "not installed: pip install --no-deps torchao==0.18.0"
    print(
        json.dumps({**report, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}, indent=2)
    )


if __name__ == "__main__":
    main()
