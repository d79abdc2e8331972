"""The training loop: batches in, better weights out, with evaluation, checkpoints and a record of it all.

A run folder holds everything needed to use, inspect or resume the run later:
config.yaml (fully resolved), tinylm_tokenizer.json, model.safetensors (best by validation loss),
checkpoints/step-N/ (training state), metrics.jsonl, loss.png, samples.txt (a sample at every evaluation, then one
from the best weights), tensorboard/ when asked.

One step: the batch (batch_size sequences over all processes) is cut into micro-batches; each process runs forward
and backward on its own micro-batches under autocast, gradients accumulate, and are averaged across processes only
on the last one; then the gradients are clipped, checked for NaN and applied. Under the same `torchrun` entry point
the processes draw the same batches and each takes its own rows, so 2 processes train what 1 process would.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import Config, parse_duration, resolve_config
from tinylm.data.loader import TokenShards
from tinylm.data.prepare import prepare
from tinylm.errors import TinylmError
from tinylm.generate import encode_prompt, stream_text
from tinylm.model import build_model, count_parameters
from tinylm.tokenizers import Tokenizer, load_tokenizer
from tinylm.training.checkpoint import (
    BEST_WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tied_names,
    write_weights,
)
from tinylm.training.distributed import Processes, gradient_sync, parallelize, reshard, start_processes
from tinylm.training.optim import build_optimizers, build_schedulers
from tinylm.training.throughput import flops_per_token, peak_flops, peak_memory_gb
from tinylm.training.tracking import Tracker

CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.txt"
MAX_ROLLBACKS = 3
"""train.on_nan skip goes back to the last checkpoint at most this many times before it gives up."""
WHOLE = StateDictOptions(full_state_dict=True)
WHOLE_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float
    elapsed_s: float
    """Wall-clock seconds of the training loop, evaluations and checkpoints included (over all resumed sessions)."""
    sample: str
    is_main: bool = True
    """False in every torchrun process but rank 0, which alone reports."""


def train(config: Config, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Train a model as `config` says and write the run folder `config.out`; `resume` continues the run there from
    its latest checkpoint. Under torchrun, every process calls this."""
    if config.model.arch == "seq2seq":  # an encoder-decoder learns a synthetic task, in its own loop
        from tinylm.training.copy_task_trainer import train_copy_task

        if resume:
            raise TinylmError("a seq2seq run cannot be resumed; train it again (it takes about a minute)")
        return train_copy_task(config, overwrite)
    processes = start_processes(config.train.device)
    try:
        return _train(config, overwrite, resume, processes)
    finally:
        processes.close()


def resume_config(run_dir: str | Path, user_values: dict[str, Any]) -> Config:
    """The config of the run in `run_dir`, with the training keys the user changes for the rest of the run."""
    saved_file = Path(run_dir) / CONFIG_FILE
    if not saved_file.is_file():
        raise TinylmError(f"{run_dir} is not a tinylm run folder (no {CONFIG_FILE}); give the --out folder of a run")
    saved = yaml.safe_load(saved_file.read_text())
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
    return resolve_config(merged)


def _train(config: Config, overwrite: bool, resume: bool, processes: Processes) -> TrainResult:
    run_dir, t = Path(config.out), config.train
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise TinylmError(f"{run_dir} has no checkpoint to resume from; train it again without --resume")
    else:
        processes.run_on_main(lambda: claim_run_dir(run_dir, overwrite))
    if t.threads:
        torch.set_num_threads(t.threads)
    if processes.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: what precision fp32 means on GPUs
        torch.backends.cudnn.allow_tf32 = True

    # Rank 0 tokenizes; the other processes then find the token files ready.
    data = processes.run_on_main(lambda: prepare(config.data)) or prepare(config.data)
    if resume:  # text changed since: data prepared again may hold other ids than the model learned
        data.check_tokenizer(load_tokenizer(run_dir))
    tokenizer = data.tokenizer
    vocab_size = config.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise TinylmError(
            f"model.vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            "set it to null to take the tokenizer's"
        )
    config = replace(config, model=replace(config.model, vocab_size=vocab_size))
    train_split, val_split = data.split("train"), data.split("val")
    for name, split in (("train", train_split), ("val", val_split)):
        if len(split) <= config.model.block_size:
            raise TinylmError(
                f"the {name} split has {len(split)} tokens, fewer than one context window "
                f"(model.block_size + 1 = {config.model.block_size + 1}); give more text or lower model.block_size"
            )
    prompt = encode_prompt(tokenizer, config.sample.prompt, "sample.prompt")  # fail before training, not after
    if processes.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
        tokenizer.save(run_dir)

    torch.manual_seed(t.seed)
    model = build_model(config.model)
    torch.manual_seed(t.seed + processes.rank)  # dropout: each process its own masks
    loop = TrainingLoop(config, model, processes, train_split, val_split, run_dir, tokenizer, prompt, resume)
    loop.say(
        f"tinylm: {count_parameters(model)['total']:,} parameters on {processes.world_size} x {processes.device}, "
        f"{loop.precision_name}, {t.batch_size} x {config.model.block_size} tokens per step in micro-batches of "
        f"{loop.micro_batch_size}, data in {data.folder}"
    )
    try:
        loop.run()
        set_model_state_dict(loop.model, loop.best_weights(), options=WHOLE)
        sample = loop.sample()
        if processes.is_main:
            with open(run_dir / SAMPLES_FILE, "a") as samples:
                samples.write(f"--- best weights (val loss {loop.best_val_loss:.4f}) ---\n{sample}\n\n")
    finally:
        loop.tracker.close()
    return TrainResult(run_dir, loop.step, loop.best_val_loss, loop.elapsed_s, sample, processes.is_main)


class NonFiniteLoss(Exception):
    def __init__(self, loss: float):
        super().__init__(f"loss {loss}")
        self.loss = loss


class TrainingLoop:
    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        processes: Processes,
        train_split: TokenShards,
        val_split: TokenShards,
        run_dir: Path,
        tokenizer: Tokenizer,
        prompt: list[int],
        resume: bool = False,
    ):
        self.config, self.processes, self.run_dir, self.tokenizer, self.prompt = (
            config,
            processes,
            run_dir,
            tokenizer,
            prompt,
        )
        t, block_size, device = config.train, config.model.block_size, processes.device
        self.device = device
        if t.batch_size % processes.world_size:
            raise TinylmError(
                f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes "
                f"({processes.world_size}): each takes an equal share of every batch"
            )
        per_process = t.batch_size // processes.world_size
        self.rows = slice(processes.rank * per_process, (processes.rank + 1) * per_process)
        if t.optimizer == "muon" and t.parallel == "fsdp" and processes.distributed:
            raise TinylmError("muon orthogonalises whole matrices, which fsdp shards; use --train.parallel ddp")

        self.autocast_dtype = autocast_dtype(t.precision, device)
        self.precision_name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[
            self.autocast_dtype
        ]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.flops_per_token = flops_per_token(model)
        peak = peak_flops(device, self.autocast_dtype)
        self.peak_flops = peak * processes.world_size if peak else None

        if t.activation_checkpointing:
            checkpoint_activations(model)
        self.micro_batch_size = t.micro_batch_size or per_process
        if t.micro_batch_size is None and device.type == "cuda" and t.parallel != "fsdp":
            self.micro_batch_size = processes.min(self._fit_micro_batch(model.to(device), per_process))
        if per_process % self.micro_batch_size:
            raise TinylmError(
                f"each process's share of the batch ({per_process} sequences) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        # `model` computes, holds the parameters and names them for checkpoints (sharded in place by FSDP);
        # `step_module` adds DDP's gradient averaging; `forward` adds compilation.
        self.step_module = parallelize(model, processes, t.parallel)
        self.model = model
        compile_model = t.compile if t.compile is not None else device.type == "cuda"
        self.forward = torch.compile(self.step_module) if compile_model else self.step_module
        self.optimizers = build_optimizers(model, t, device.type)
        self.schedulers = build_schedulers(self.optimizers, t)
        self.autocast = functools.partial(
            torch.autocast, device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

        self.batch_generator = torch.Generator().manual_seed(t.seed)
        # The same batches at every evaluation, so that two evaluations differ only by the weights.
        fixed = torch.Generator().manual_seed(t.seed + 1)
        self.eval_batches = {
            name: [split.sample_batch(t.batch_size, block_size, fixed, self.rows) for _ in range(t.eval_batches)]
            for name, split in (("train", train_split), ("val", val_split))
        }
        self.train_split = train_split
        self.step = 0
        self.best_val_loss = float("inf")
        self.evals_without_improvement = 0
        self.rollbacks = 0
        self.elapsed_before = 0.0  # training time of the sessions before a resume
        self.elapsed_s = 0.0
        self.start = time.perf_counter()
        resumed_from = latest_checkpoint(run_dir) if resume else None
        if resumed_from is not None:
            self.restore(resumed_from)
            self.say(f"tinylm: resumed {run_dir} from {resumed_from.name}")
        self.tracker = Tracker(run_dir, t.log, config.to_dict(), self.step if resume else None, processes.is_main)

    def say(self, message: str) -> None:
        if self.processes.is_main:
            tqdm.write(message)

    def run(self) -> None:
        t = self.config.train
        self.model.train()
        self.start = time.perf_counter()
        self.last_log = (self.step, self.start)
        deadline = self.start + parse_duration(t.max_time) if t.max_time else math.inf
        if t.on_nan == "skip" and latest_checkpoint(self.run_dir) is None:
            self.save_checkpoint()  # a good state to go back to from the very start
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if self.processes.is_main else True,
        )
        with bar, _stop_requests() as stop_requested:
            self.bar = bar
            while self.step < t.max_steps:
                lr = self.schedulers[-1].get_last_lr()[0]  # AdamW's, the optimizer every run has
                try:
                    loss, grad_norm = self.train_step()
                except NonFiniteLoss as error:
                    self.roll_back(error.loss)
                    continue
                except torch.OutOfMemoryError:
                    raise TinylmError(
                        f"CUDA ran out of memory in a micro-batch of {self.micro_batch_size} sequences x "
                        f"{self.config.model.block_size} tokens; lower --train.micro-batch-size, or try "
                        "--train.activation-checkpointing true or --train.parallel fsdp"
                    ) from None
                self.step += 1
                bar.update()
                if self.step % t.log_interval == 0:
                    self._log_progress(loss, lr, grad_norm)
                evaluated = self.step % t.eval_interval == 0 or self.step == t.max_steps
                stop = self._evaluate_and_checkpoint() if evaluated else None
                if self._any_process(stop_requested()):
                    path = self.save_checkpoint()
                    raise TinylmError(
                        f"interrupted at step {self.step}; training state saved in {path}; "
                        f"continue with `tinylm train --resume {self.run_dir}`"
                    )
                if stop is None and self._any_process(time.perf_counter() > deadline):
                    stop = f"train.max_time {t.max_time} reached"
                    if not evaluated:
                        self._evaluate_and_checkpoint()
                if stop:
                    self.tracker.log({"step": self.step, "stopped": stop})
                    self.say(f"stopped at step {self.step}: {stop}")
                    break

    def train_step(self) -> tuple[float, float]:
        """One optimizer step. Returns the loss (mean over the whole batch) and the gradient norm before clipping."""
        t = self.config.train
        inputs, targets = self.train_split.sample_batch(
            t.batch_size, self.config.model.block_size, self.batch_generator, self.rows
        )
        micro_batches = list(zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size)))
        loss_sum = torch.zeros((), device=self.device)
        for index, (x, y) in enumerate(micro_batches):
            with gradient_sync(self.step_module, index == len(micro_batches) - 1):
                with self.autocast():
                    _, loss = self.forward(x.to(self.device), y.to(self.device))
                loss = loss / len(micro_batches)  # the mean over the process's rows, like one big batch
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = self._clip_gradients()
        loss_sum = self.processes.sum(loss_sum) / self.processes.world_size
        loss_value, norm_value = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one device sync
        # Under fp16 an infinite gradient is the loss scaler's business (it skips the step and lowers the scale).
        if not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value)):
            self.model.zero_grad(set_to_none=True)
            raise NonFiniteLoss(loss_value if not math.isfinite(loss_value) else norm_value)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            self.scaler.step(optimizer)
            scheduler.step()
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _clip_gradients(self) -> torch.Tensor:
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.train.grad_clip
        norm = torch.nn.utils.get_total_norm(gradients, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP: each process holds a shard of the gradients
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, norm, foreach=True)
        return norm

    def roll_back(self, loss: float) -> None:
        """A NaN or infinite loss: stop, or (on_nan skip) go back to the last checkpoint and go on with new batches."""
        checkpoint = latest_checkpoint(self.run_dir)
        if self.config.train.on_nan == "stop" or self.rollbacks >= MAX_ROLLBACKS:
            tried = f" (after {self.rollbacks} rollbacks)" if self.rollbacks else ""
            raise TinylmError(
                f"the loss became {loss} at step {self.step + 1}{tried}; lower train.learning_rate or raise "
                "train.warmup_steps (keep train.grad_clip on), or pass --train.on-nan skip to go back to the last "
                "checkpoint and continue past those batches"
            )
        batches_now = self.batch_generator.get_state()
        self.restore(checkpoint)
        self.batch_generator.set_state(batches_now)  # skip the batches that led to the NaN
        self.rollbacks += 1
        self.tracker.rewind(self.step)
        self.tracker.log({"step": self.step, "rolled_back_to": self.step, "bad_loss": str(loss)})
        self.say(f"loss {loss} at a step after {self.step}: back to {checkpoint.name}, continuing with new batches")

    def _log_progress(self, loss: float, lr: float, grad_norm: float) -> None:
        now = time.perf_counter()
        last_step, last_time = self.last_log
        tokens = (self.step - last_step) * self.config.train.batch_size * self.config.model.block_size
        tokens_per_s = tokens / (now - last_time)
        self.last_log = (self.step, now)
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s),
            "memory_gb": round(peak_memory_gb(self.device), 3),
            "elapsed_s": self.elapsed_before + now - self.start,
        }
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.tracker.log(record)

    def _evaluate_and_checkpoint(self) -> str | None:
        """Evaluate, keep the best weights, save a checkpoint; the reason to stop early, if there is one."""
        began = time.perf_counter()
        losses = self.estimate_losses()
        improved = losses["val"] < self.best_val_loss
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        if improved:
            self.best_val_loss = losses["val"]
            weights = get_model_state_dict(self.model, options=WHOLE_ON_CPU)
            if self.processes.is_main:
                write_weights(
                    weights,
                    self.run_dir / BEST_WEIGHTS,
                    tied_names(self.model),
                    {"step": self.step, "val_loss": losses["val"]},
                )
        self.elapsed_s = self.elapsed_before + time.perf_counter() - self.start
        self.save_checkpoint()
        self.tracker.log(
            {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"], "elapsed_s": self.elapsed_s}
        )
        self.tracker.plot_losses()
        sample = self.sample()
        self.tracker.text("sample", sample, self.step)
        if self.processes.is_main:
            with open(self.run_dir / SAMPLES_FILE, "a") as samples:
                samples.write(f"--- step {self.step} ---\n{sample}\n\n")
        self.say(
            f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            f"{' (best)' if improved else ''}, {self.elapsed_s:.1f}s"
        )
        # Evaluation time is not training throughput: move the last log mark forward by it.
        last_step, last_time = self.last_log
        self.last_log = (last_step, last_time + time.perf_counter() - began)
        patience = self.config.train.patience
        if patience and self.evals_without_improvement >= patience:
            return f"no better val loss in {patience} evaluations"
        return None

    @torch.no_grad()
    def estimate_losses(self) -> dict[str, float]:
        """Mean loss over the fixed train and val batches, all processes together."""
        self.model.eval()
        totals = []
        for batches in self.eval_batches.values():
            total = torch.zeros((), device=self.device)
            for inputs, targets in batches:
                for x, y in zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size)):
                    with self.autocast():
                        _, loss = self.forward(x.to(self.device), y.to(self.device))
                    total += loss.float() * len(x)
            totals.append(total)
        sequences = self.config.train.eval_batches * self.config.train.batch_size
        means = (self.processes.sum(torch.stack(totals)) / sequences).tolist()
        self.model.train()
        reshard(self.model)
        return dict(zip(self.eval_batches, means))

    def sample(self) -> str:
        """The run's sample prompt continued by the current weights (every process computes it: FSDP needs all)."""
        s = self.config.sample
        pieces = stream_text(self.model, self.tokenizer, [self.prompt], s, [self.tokenizer.end_of_text])
        text = "".join(piece.text for piece in pieces)
        reshard(self.model)
        return s.prompt + text

    def save_checkpoint(self) -> Path | None:
        """Gather the whole training state (every process takes part) and write it from rank 0."""
        weights = get_model_state_dict(self.model, options=WHOLE_ON_CPU)
        optimizers = [get_optimizer_state_dict(self.model, o, options=WHOLE_ON_CPU) for o in self.optimizers]
        rng = self.processes.gather(_rng_state(self.device))
        if not self.processes.is_main:
            return None
        trainer_state = {
            "optimizers": optimizers,
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "batch_rng": self.batch_generator.get_state(),
        }
        info = {
            "best_val_loss": self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
            "world_size": self.processes.world_size,
        }
        keep = self.config.train.keep_checkpoints
        return save_checkpoint(self.run_dir, self.step, weights, tied_names(self.model), trainer_state, info, keep)

    def restore(self, path: Path) -> None:
        """Put the model, optimizers, schedule, scaler, RNGs, data position and counters back as `path` saved them."""
        weights, state, info = load_checkpoint(path)
        set_model_state_dict(self.model, weights, options=WHOLE)
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            set_optimizer_state_dict(self.model, optimizer, saved, options=WHOLE)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.processes.rank % len(state["rng"])]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.batch_generator.set_state(state["batch_rng"])
        self.step = info["step"]
        self.best_val_loss = info["best_val_loss"]
        self.evals_without_improvement = info["evals_without_improvement"]
        self.elapsed_before = self.elapsed_s = info["elapsed_s"]

    def best_weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / BEST_WEIGHTS), device=str(self.device))

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process: every process stops at the same step."""
        if not self.processes.distributed:
            return flag
        return bool(self.processes.sum(torch.tensor(float(flag), device=self.device)) > 0)

    def _fit_micro_batch(self, model: torch.nn.Module, per_process: int) -> int:
        """The largest micro-batch dividing the process's share whose forward and backward leave room in 90% of
        the GPU's memory for AdamW's two fp32 moments."""
        optimizer_bytes = 2 * 4 * sum(p.numel() for p in model.parameters())
        total = torch.cuda.get_device_properties(self.device).total_memory
        for size in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                x = torch.zeros(size, self.config.model.block_size, dtype=torch.long, device=self.device)
                with self.autocast():
                    _, loss = model(x, x)
                loss.backward()
                fits = torch.cuda.max_memory_allocated(self.device) + optimizer_bytes < 0.9 * total
            except torch.OutOfMemoryError:
                fits = False
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if fits:
                return size
        raise TinylmError(
            "one sequence per micro-batch does not fit in GPU memory; lower model.block_size, use "
            "--train.activation-checkpointing true, or --train.parallel fsdp over several GPUs"
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting; None is plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Make each block recompute its activations in the backward pass; the model's code stays as it is."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        raise TinylmError("train.activation_checkpointing needs a model made of blocks (model.arch gpt)")
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step it is in, so that the state it saves is whole;
    a second signal acts at once."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield lambda: False
        return

    def request_stop(signum: int, frame: Any) -> None:
        requested.append(signum)
        signal.signal(signum, previous[signum])

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A run folder is never overwritten by accident: only an earlier run's folder, and only when asked."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise TinylmError(f"{run_dir} exists and is not a tinylm run folder; choose another --out")
    if not overwrite:
        raise TinylmError(f"{run_dir} already holds a run; choose another --out or pass --overwrite to replace it")
    shutil.rmtree(run_dir)
