"""The GPU check: what tinylm does on one CUDA GPU, one JSON line per figure, in a few minutes and with nothing fetched.

    python bench/gpu_check.py [--smoke] [--only NAME ...] [--budget SECONDS]

Checks, in order (each line has "check", "status" ok | skipped | failed, "seconds", and its figures):
  environment       the GPU, torch, CUDA, the dense bf16 peak MFU is measured against, package versions
  attention         which scaled_dot_product_attention kernels a bf16 training step at GPT-2's head shape runs
  gpt2_eager        gpt2-124m training tokens/s and MFU in bf16, the engine's own step (Engine.train_step)
  gpt2_compiled     the same with train.compile (torch.compile), its compile time apart, and where the GPU's time
                    goes (the share of wall time a kernel runs; matmul, attention, optimizer and other kernels' shares)
  fp16_scaler       a T4-like run (fp16 autocast + GradScaler, a small model) through tinylm.train: finite losses
  packed_documents  data.packing bos (attention kept inside each document by a mask): its kernels, tokens/s against
                    random windows at the same shape
  torchrun          `torchrun --nproc-per-node 1 -m tinylm train` of a tiny recipe
  qlora             a QLoRA fine-tune (4-bit NF4 base, bitsandbytes) of a distilgpt2-sized GPT-2 made here
  total             the whole check's wall time and which checks failed

A check that fails prints its error and the next one runs; the exit status is 1 when any failed. Lines go to stdout,
everything the checks print besides to stderr. The text is synthetic (random letters, character tokens) so that
nothing is downloaded: throughput depends on shapes, not on what the tokens mean, and gpt2-124m keeps GPT-2's
50257-token vocabulary. `--smoke` runs every check at tiny sizes, on CPU where there is no GPU (the checks that need
CUDA print skipped lines): tests/test_gpu_check.py runs it. On a GPU machine without registries, `make gpu-check`
installs the carried wheels first (bench/gpu_wheels.py, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import tinylm
from tinylm.runs import ENVIRONMENT_FILE, METRICS_FILE
from tinylm.training.checkpoint import latest_checkpoint, load_checkpoint
from tinylm.training.distributed import start_processes
from tinylm.training.engine import Engine
from tinylm.training.tasks.pretrain import Pretraining
from tinylm.training.throughput import peak_flops

SMOKE = {
    "model.block_size": 64,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.vocab_size": None,
    "train.batch_size": 4,
    "train.max_steps": 4,
    "train.eval_interval": 4,
    "train.log_interval": 1,
    "train.threads": 1,
}
"""What --smoke sets over every check's own settings: the code paths at the least work (one thread: on CPU, tiny
matrices only lose time to more)."""
GPT2_HEADS = {"model.preset": "gpt2-124m", "model.n_layer": 2, "train.batch_size": 8, "train.compile": False}
"""GPT-2's attention (12 heads of 64, 1024 positions) in two blocks, eager: the kernels of the full model, sooner."""


class OutOfTime(Exception):
    """A check ran past its share of the budget."""


@dataclasses.dataclass
class Bench:
    """Where the checks run: the device, the sizes, and a scratch folder with the synthetic text in it."""

    device: str
    smoke: bool
    folder: Path

    def __post_init__(self) -> None:
        rng = random.Random(0)
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(2000)]
        count, lines = (200, (1, 4)) if self.smoke else (2000, (2, 45))
        documents = [_document(rng, words, rng.randint(*lines)) for _ in range(count)]
        self.text = self.folder / "text.txt"
        self.text.write_text("\n\n".join(documents))
        self.documents = self.folder / "documents.jsonl"
        self.documents.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def steps(self) -> tuple[int, int]:
        """Warm-up and timed steps of a throughput figure."""
        return (1, 2) if self.smoke else (5, 20)

    def overrides(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """A run's recipe keys: the synthetic text, output in the scratch folder, this device, `settings`, and the
        smoke sizes over them."""
        common = {
            "data.source": str(self.text),
            "data.data_dir": str(self.folder / "data"),
            "train.device": self.device,
            "train.eval_batches": 1,
            "sample.max_new_tokens": 16,
            "out": str(self.folder / name),
        }
        return {**common, **settings, **(SMOKE if self.smoke else {})}

    def engine(self, name: str, settings: dict[str, Any]) -> Engine:
        """The engine `tinylm train` runs, set up for pretraining (its run folder claimed), ready to step."""
        task = Pretraining(tinylm.load_config(None, self.overrides(name, settings)))
        engine = Engine(task, start_processes(self.device), overwrite=False, resume=False)
        engine.model.train()
        return engine


def _document(rng: random.Random, words: list[str], lines: int) -> str:
    """`lines` lines of 3 to 15 random words: documents of about 50 to 2500 characters, around GPT-2's 1024."""
    return "\n".join(" ".join(rng.choices(words, k=rng.randint(3, 15))) + "." for _ in range(lines))


# --- the checks ---------------------------------------------------------------------------------------------------


def environment(bench: Bench) -> dict[str, Any]:
    device = torch.device(bench.device)
    found = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if bench.cuda else "cpu",
    }
    if bench.cuda:
        properties = torch.cuda.get_device_properties(device)
        peak = peak_flops(device, torch.bfloat16)
        found |= {
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            "bf16": torch.cuda.is_bf16_supported(),
            "peak_bf16_tflops": peak / 1e12 if peak else None,
            "sdpa_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        }
    packages = ("transformers", "peft", "accelerate", "bitsandbytes", "jsonargparse", "gguf")
    return found | {"packages": {name: _version(name) for name in packages}}


def attention(bench: Bench) -> dict[str, Any]:
    engine = bench.engine("attention", {**GPT2_HEADS, **_precision(bench)})
    engine.train_step()  # first-call set-up stays out of the profile
    ops = attention_ops(engine.train_step)
    return {"precision": engine.precision_name, "head_dim": engine.model.config.head_dim, **ops}


def gpt2_eager(bench: Bench) -> dict[str, Any]:
    return training_speed(bench, bench.engine("gpt2_eager", {**_gpt2(bench), "train.compile": False}))


def gpt2_compiled(bench: Bench) -> dict[str, Any]:
    try:
        engine = bench.engine("gpt2_compiled", {**_gpt2(bench), "train.compile": True})
        return training_speed(bench, engine) | ({"gpu_time": gpu_time(engine.train_step)} if bench.cuda else {})
    finally:
        torch._dynamo.reset()  # the compiled graphs hold on to the model's memory


def fp16_scaler(bench: Bench) -> dict[str, Any]:
    """fp16 autocast with the GradScaler, as on a T4 (no bf16): a small model through the whole of tinylm.train,
    uncompiled to keep within the budget (the compiled path has its own check)."""
    settings = {
        "model.block_size": 256,
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 256,
        "train.batch_size": 16,
        "train.precision": "fp16",
        "train.compile": False,
        "train.max_steps": 60,
        "train.warmup_steps": 10,
        "train.eval_interval": 60,
        "train.log_interval": 10,
    }
    result = tinylm.train(tinylm.load_config(None, bench.overrides("fp16_scaler", settings)))
    losses = [record["loss"] for record in _metrics(result.run_dir) if "loss" in record]
    scaler = load_checkpoint(latest_checkpoint(result.run_dir)).trainer_state["scaler"]
    precision = json.loads((result.run_dir / ENVIRONMENT_FILE).read_text())["sessions"][-1]["precision"]
    scale = scaler.get("scale") if scaler else None
    if precision != "fp16 autocast" or not scale:
        raise RuntimeError(f"ran in {precision} with loss scale {scale}: the GradScaler was not on")
    if not all(map(math.isfinite, [*losses, result.best_val_loss])):
        raise RuntimeError(f"non-finite losses {losses} (val {result.best_val_loss})")
    return {
        "precision": precision,
        "loss_scale": scale,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "val_loss": result.best_val_loss,
        "steps": result.steps,
    }


def packed_documents(bench: Bench) -> dict[str, Any]:
    settings = {**_gpt2(bench), "train.batch_size": 32, "data.source": str(bench.documents), "train.compile": False}
    packed = bench.engine("packed_documents", {**settings, "data.packing": "bos"})
    packed.train_step()
    ops = attention_ops(packed.train_step)
    packed_speed = timed_steps(packed, bench.steps)
    del packed
    random_speed = timed_steps(bench.engine("random_windows", settings), bench.steps)
    return {
        **ops,
        "tokens_per_s": packed_speed["tokens_per_s"],
        "random_windows_tokens_per_s": random_speed["tokens_per_s"],
        "packed_over_random": packed_speed["tokens_per_s"] / random_speed["tokens_per_s"],
        "last_loss": packed_speed["last_loss"],
    }


def torchrun(bench: Bench) -> dict[str, Any]:
    settings = {
        "model.block_size": 64,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 64,
        "train.max_steps": 20,
        "train.batch_size": 8,
        "train.eval_interval": 10,
        "train.log_interval": 5,
    }
    overrides = bench.overrides("torchrun", settings)
    arguments = [
        f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    command = [*launcher, "-m", "tinylm", "train", *arguments]
    # Its own process group: out of time, the launcher and the worker it started go together.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    print(out, err, sep="\n")  # with the checks' other chatter (stderr, see main)
    if process.returncode != 0:
        last = [line for line in err.splitlines() if line.strip()][-1:] or ["no output"]
        raise RuntimeError(f"torchrun exited with {process.returncode}: {last[0]}")
    run = Path(overrides["out"])
    losses = [record["loss"] for record in _metrics(run) if "loss" in record]
    return {"steps": load_checkpoint(latest_checkpoint(run)).info["step"], "last_loss": losses[-1]}


def qlora(bench: Bench, bits: int | None = 4) -> dict[str, Any]:
    """A LoRA fine-tune of a distilgpt2-shaped GPT-2 (random weights, a byte-level BPE trained here) loaded in
    `bits`-bit weights: QLoRA with the default 4; None fine-tunes the same base unquantized (any device)."""
    import transformers  # here: the one check that needs it, and a slow import

    from tinylm.config import FinetuneConfig, finetune_train_defaults
    from tinylm.tokenizers import END_OF_TEXT, HuggingFaceTokenizer

    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "silver", "garden"]
    examples = [{"instruction": "Write the word in capitals.", "input": w, "output": w.upper()} for w in words * 6]
    data = bench.folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in examples))
    texts = [f"{e['instruction']}\n{e['input']}\n{e['output']}" for e in examples]
    backend = HuggingFaceTokenizer.train_bpe(texts, 300).backend
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT)
    smoke = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128, "vocab_size": len(tokenizer)}
    shape = smoke if bench.smoke else {}
    config = transformers.GPT2Config(**{"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024, **shape})
    torch.manual_seed(0)
    base = bench.folder / "distilgpt2-sized"
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    train = dataclasses.replace(
        finetune_train_defaults(),
        device=bench.device,
        max_steps=SMOKE["train.max_steps"] if bench.smoke else 30,
        learning_rate=3e-3,
        batch_size=8,
        eval_interval=30,
    )
    finetune = FinetuneConfig(
        base=str(base), data=str(data), out=str(bench.folder / "qlora"), bits=bits, held_out_examples=10, train=train
    )
    result = tinylm.finetune(finetune)
    return {
        "bits": bits,
        "held_out_loss_before": result.held_out_loss_before,
        "held_out_loss_after": result.held_out_loss_after,
        "trainable_parameters": result.trainable_parameters,
        "peak_gpu_memory_mb": result.peak_gpu_memory_mb,
    }


# --- measuring ------------------------------------------------------------------------------------------------------


def training_speed(bench: Bench, engine: Engine) -> dict[str, Any]:
    """Tokens/s and MFU of the engine's training step, after warm-up steps (which compile, when it compiles)."""
    speed = timed_steps(engine, bench.steps)
    return {
        "precision": engine.precision_name,
        "compiled": engine.forward is not engine.step_module,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "batch_tokens": engine.task.train.batch_size * engine.model.config.block_size,
        "micro_batch_size": engine.micro_batch_size,
        "flops_per_token": engine.flops_per_token,
        "peak_tflops": engine.peak_flops / 1e12 if engine.peak_flops else None,
        **speed,
        "mfu": engine.flops_per_token * speed["tokens_per_s"] / engine.peak_flops if engine.peak_flops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else None,
    }


def timed_steps(engine: Engine, steps: tuple[int, int]) -> dict[str, Any]:
    """Wall-clock time of `steps` (warm-up, timed) training steps; each ends in a device sync (it reads the loss)."""
    warmup, timed = steps
    began = time.perf_counter()
    for _ in range(warmup):
        engine.train_step()
    warmed = time.perf_counter()
    tokens = 0
    for _ in range(timed):
        loss, _, step_tokens = engine.train_step()
        tokens += step_tokens
    seconds = time.perf_counter() - warmed
    return {
        "warmup_s": warmed - began,
        "step_ms": seconds / timed * 1e3,
        "tokens_per_s": tokens / seconds,
        "last_loss": loss,
    }


KERNEL_KINDS = {
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "cublas"),
    "attention": ("attention", "sdpa", "flash", "fmha"),
    "optimizer": ("adam", "foreach", "multi_tensor"),
}
"""Kernel name fragments of each kind of GPU work; a kernel matching none is `other` (mostly fused elementwise work,
norms and the loss)."""


def gpu_time(step: Callable[[], Any], steps: int = 3) -> dict[str, Any]:
    """Where `steps` calls of `step` spend the GPU's time: the share of wall time a kernel runs (the rest is the GPU
    waiting on the CPU) and each kind of kernel's share of the kernels' time."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - began) * 1e6
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(event.device_time for event in kernels)
    shares = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in kernels:
        name = event.name.lower()
        kind = next((kind for kind, marks in KERNEL_KINDS.items() if any(mark in name for mark in marks)), "other")
        shares[kind] += event.device_time / busy_us
    return {"busy_share": busy_us / wall_us, "kernel_shares": {kind: round(v, 4) for kind, v in shares.items()}}


def attention_ops(step: Callable[[], Any]) -> dict[str, Any]:
    """The attention operators one call of `step` runs, as the profiler names them, and the SDPA backends they
    belong to (flash, cudnn, efficient, math)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    ops = sorted({event.key for event in profile.key_averages() if "attention" in event.key.lower()})
    backends = [name for name in ("flash", "cudnn", "efficient", "math") if any(name in op.lower() for op in ops)]
    return {"sdpa_backends": backends, "attention_ops": ops}


def _gpt2(bench: Bench) -> dict[str, Any]:
    return {"model.preset": "gpt2-124m", "train.batch_size": 64, **_precision(bench)}


def _precision(bench: Bench) -> dict[str, Any]:
    """bf16 on the GPU, the CPU's default (fp32) in a smoke run without one."""
    return {"train.precision": "bf16"} if bench.cuda else {}


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- running them ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[..., dict[str, Any]]
    budget_s: int
    """The most seconds it may take (sized for an H100-class GPU); it fails past that."""
    needs_cuda: bool = False
    needs_module: str | None = None


CHECKS = [
    Check("environment", environment, 30),
    Check("attention", attention, 60),
    Check("gpt2_eager", gpt2_eager, 90),
    Check("gpt2_compiled", gpt2_compiled, 180, needs_cuda=True),
    Check("fp16_scaler", fp16_scaler, 60),
    Check("packed_documents", packed_documents, 90),
    Check("torchrun", torchrun, 120),
    # Last: a native library that does not fit the GPU can take the whole process down.
    Check("qlora", qlora, 120, needs_cuda=True, needs_module="bitsandbytes"),
]


def run_check(check: Check, bench: Bench, seconds_left: float) -> dict[str, Any]:
    """The check's JSON record: its figures, or why it was skipped, or the error it stopped at."""
    record: dict[str, Any] = {"check": check.name}
    if check.needs_cuda and not bench.cuda:
        return record | {"status": "skipped", "reason": "no CUDA"}
    if check.needs_module and importlib.util.find_spec(check.needs_module) is None:
        return record | {"status": "skipped", "reason": f"{check.needs_module} is not installed"}
    if seconds_left < 5:
        return record | {"status": "skipped", "reason": "--budget spent before it could start"}
    limit = min(check.budget_s, seconds_left)
    began = time.perf_counter()
    try:
        with _time_limit(math.ceil(limit)):
            record |= {"status": "ok", **check.run(bench)}
    except Exception as error:  # every failure is a line, and the next check runs
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        record |= {"status": "failed", "error": f"{type(error).__name__}: {message}"[:500]}
    finally:
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return record | {"seconds": round(time.perf_counter() - began, 2)}


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise OutOfTime(f"over its {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Every check at tiny sizes; on CPU without a GPU.")
    parser.add_argument("--only", nargs="+", choices=[check.name for check in CHECKS], help="Run only these checks.")
    parser.add_argument("--budget", type=float, default=360, help="Seconds for all checks; later ones skip past it.")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("torch sees no CUDA GPU here; --smoke runs every check's code at tiny sizes on CPU")
    os.environ["TINYLM_OFFLINE"] = "1"  # nothing is fetched: a check that would download fails at once
    os.environ["HF_HUB_OFFLINE"] = "1"
    lines = sys.stdout
    began = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="tinylm-gpu-check-") as scratch:
        bench = Bench(device, args.smoke, Path(scratch))
        for check in CHECKS:
            if args.only and check.name not in args.only:
                continue
            with contextlib.redirect_stdout(sys.stderr):  # training's own printing stays off the JSON lines
                record = run_check(check, bench, args.budget - (time.perf_counter() - began))
            records.append(record)
            print(json.dumps(record), file=lines, flush=True)
    failed = [record["check"] for record in records if record["status"] == "failed"]
    skipped = [record["check"] for record in records if record["status"] == "skipped"]
    total = {"check": "total", "status": "failed" if failed else "ok", "failed": failed, "skipped": skipped}
    print(json.dumps(total | {"seconds": round(time.perf_counter() - began, 2)}), file=lines, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
