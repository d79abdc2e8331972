"""CPU inference side by side: tinylm float32, tinylm int8 (`--quantize int8`), transformers `generate`, and a real
llama.cpp (node-llama-cpp's prebuilt binaries, `make build/node-llama-cpp/.installed`) on tinylm's GGUF exports at
f32, q8_0 and q4_0: greedy decoding speed on 1 and 2 threads, and bits per byte on held-out text.

The model is a ~14M-parameter llama-style run (7 layers, width 384, SwiGLU, RoPE, bpe:4096) trained for
--train-steps (default 250) on TinyStories head10k (kept in out/bench-llama-15m; a later call reuses it), or any
llama-style run given with --run. Bits per byte are read the same way for every engine: the held-out text's tokens
cut into windows of --window tokens, each read from an empty cache, nats summed over every predicted token, divided
by the text's bytes.

    python bench/decode_llama_cpp.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the node-llama-cpp driver the tests use

from decode import transformers_greedy  # noqa: E402  (bench/, the script's folder)
from llama_cpp import missing, run_llama_cpp  # noqa: E402

import tinylm  # noqa: E402
from tinylm.config import SampleConfig  # noqa: E402
from tinylm.data.documents import open_source  # noqa: E402
from tinylm.generate import generate_tokens  # noqa: E402
from tinylm.gguf_export import export_gguf  # noqa: E402
from tinylm.hf import export_hf  # noqa: E402
from tinylm.model import count_parameters  # noqa: E402

LLAMA_15M = {
    "model.n_layer": 7,
    "model.n_head": 6,
    "model.n_embd": 384,
    "model.block_size": 256,
    "model.positions": "rope",
    "model.norm": "rmsnorm",
    "model.mlp": "swiglu",
    "model.bias": False,
    "model.dropout": 0.0,
    "train.batch_size": 8,  # 2048 tokens a step: a model worth measuring bits per byte on, in minutes on a CPU
}
GGUF_TYPES = ("f32", "q8_0", "q4_0")


def trained_run(steps: int) -> Path:
    out = ROOT / "out" / "bench-llama-15m"
    if not (out / "model.safetensors").is_file():
        overrides = {**LLAMA_15M, "train.max_steps": steps, "train.eval_interval": steps, "out": str(out)}
        tinylm.train(tinylm.load_config(ROOT / "configs" / "tinystories-cpu.yaml", overrides), overwrite=True)
    return out


def held_out_windows(run: tinylm.Run, max_bytes: int, window: int) -> tuple[list[list[int]], int]:
    """The run's validation text (up to max_bytes, whole documents) as windows of window + 1 tokens overlapping by
    one, so every token after the first is predicted once; and the text's UTF-8 bytes."""
    tokens, text_bytes = [run.tokenizer.end_of_text], 0
    for document in open_source(run.config.data).split_documents("val"):
        if text_bytes >= max_bytes:
            break
        tokens += [*run.tokenizer.encode(document), run.tokenizer.end_of_text]
        text_bytes += len(document.encode())
    return [tokens[i : i + window + 1] for i in range(0, len(tokens) - 1, window)], text_bytes


def torch_bits_per_byte(model, windows: list[list[int]], text_bytes: int, hf: bool = False) -> float:
    nats = 0.0
    with torch.no_grad():
        for ids in windows:
            inputs, targets = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
            logits = model(inputs).logits[0] if hf else model(inputs)[0][0]
            nats += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return nats / math.log(2) / text_bytes


def tokens_per_second(decode, new_tokens: int, rounds: int) -> float:
    decode()  # warm-up
    best = min(timed(decode) for _ in range(rounds))
    return new_tokens / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained llama-style run (default: train one, see above).")
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument(
        "--rounds", type=int, default=3, help="Decodes per engine and thread count; the fastest counts."
    )
    parser.add_argument("--eval-bytes", type=int, default=60_000, help="Held-out text for bits per byte.")
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    if missing():
        sys.exit(f"bench/decode_llama_cpp.py: {missing()}")

    run_dir = args.run or trained_run(args.train_steps)
    fp32 = tinylm.load(run_dir, device="cpu")
    int8 = tinylm.load(run_dir, quantize="int8")
    folder = Path(tempfile.mkdtemp(prefix="tinylm-bench-"))
    ggufs = {kind: str(export_gguf(run_dir, folder / f"{kind}.gguf", kind)) for kind in GGUF_TYPES}
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(run_dir, folder / "hf")), dtype=torch.float32).eval()

    windows, text_bytes = held_out_windows(fp32, args.eval_bytes, args.window)
    bpb = {
        "tinylm_fp32": torch_bits_per_byte(fp32.model, windows, text_bytes),
        "tinylm_int8": torch_bits_per_byte(int8.model, windows, text_bytes),
        "transformers": torch_bits_per_byte(hf, windows, text_bytes, hf=True),
    }
    for kind, path in ggufs.items():
        nats = run_llama_cpp({"model": path, "score": windows, "context": args.window + 1}, timeout=1800)["nats"]
        bpb[f"llama_cpp_{kind}"] = sum(map(sum, nats)) / math.log(2) / text_bytes

    prompt = fp32.tokenizer.encode("Once upon a time, there was a little")
    sampling = SampleConfig(max_new_tokens=args.new_tokens, temperature=0, top_k=None)
    ids = torch.tensor([prompt])
    speed: dict[str, dict[int, float]] = {name: {} for name in bpb if name != "llama_cpp_q4_0"}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, run in (("tinylm_fp32", fp32), ("tinylm_int8", int8)):
            speed[name][threads] = tokens_per_second(
                lambda run=run: list(generate_tokens(run.model, [prompt], sampling)), args.new_tokens, args.rounds
            )

        decode = lambda: transformers_greedy(hf, ids, args.new_tokens)  # noqa: E731
        speed["transformers"][threads] = tokens_per_second(decode, args.new_tokens, args.rounds)
        for kind in ("f32", "q8_0"):
            job = {
                "model": ggufs[kind],
                "decode": {"ids": prompt, "tokens": args.new_tokens, "repeats": args.rounds},
                "threads": threads,
                "context": len(prompt) + args.new_tokens + 1,
            }
            speed[f"llama_cpp_{kind}"][threads] = args.new_tokens / run_llama_cpp(job)["decode_seconds"]

    report = {
        "run": str(run_dir),
        "parameters": count_parameters(fp32.model)["total"],
        "held_out": {"bytes": text_bytes, "tokens": sum(len(w) - 1 for w in windows), "window": args.window},
        "bits_per_byte": {name: round(value, 4) for name, value in bpb.items()},
        "decode_tokens_per_s": {
            name: {f"{t}_threads": round(v, 1) for t, v in by_threads.items()} for name, by_threads in speed.items()
        },
        "tinylm_fp32_vs_llama_cpp_f32": {
            f"{t}_threads": round(speed["tinylm_fp32"][t] / speed["llama_cpp_f32"][t], 2) for t in args.threads
        },
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
